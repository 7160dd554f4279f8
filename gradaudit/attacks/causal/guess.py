"""The model's own likeliest next tokens after a prefix: checked before the screen's sample.

A causal LM is trained to predict its text, and the adversary holds its weights: on SmolLM2
the true next token of SST-2, CoLA and Rotten Tomatoes text was among the model's 64 likeliest
for 59-69 % of positions, and among its 1,024 likeliest for 81-88 % (docs/span-method.md, "The
screen"). The screen's regression ranks a word piece ("cin" -> "emat") or a repeat tens of
thousands deep; the model puts it near the top. A guess only orders the exact checks: what
fits is still decided by the row space alone, so text the model finds unlikely (a password)
is found by the stages after it, at their cost.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from gradaudit.model.lora import inner_model


class NextTokenGuess:
    """Vocabulary indices (of `vocab`, candidate token ids) in the model's order of
    likelihood after each of several prefixes, `count` per prefix."""

    def __init__(self, model: nn.Module, vocab: torch.Tensor, count: int) -> None:
        self.model = model
        self.vocab = vocab
        self.count = min(count, int(vocab.shape[0]))
        params = inspect.signature(inner_model(model).forward).parameters
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @torch.no_grad()
    def likeliest(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, count) vocabulary indices after prefixes `tokens` (N, t), t >= 1, likeliest
        first: one forward pass of the whole model over the prefixes."""
        logits = self.model(input_ids=tokens, **self.last_only).logits[:, -1]
        return logits[:, self.vocab].topk(self.count, dim=1).indices
