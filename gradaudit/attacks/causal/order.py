"""Layer 0 of a rotary decoder: a token set the gradient gives, ordered by search.

Its query, key and value take RMSNorm(E[v]) whatever the position (the rotation acts inside
attention), so the row space identifies the batch's visible tokens as a set and no order.
Each sentence is ordered by a beam search over that set under the model's own next-token
probabilities after a document-start token (at batch size 1 every token of the set must be
used); the finished orders are
then ranked by how close their gradient, with the model's guess as the last token, comes to
the observed one, one sentence at a time. (Swapping tokens while that misfit falls did not
find SST-2 sentence 0's order: docs/span-measurements.md.)
"""

from __future__ import annotations

import torch
from torch import nn

from gradaudit.attacks.causal.last import LastTokens
from gradaudit.model.adapter import ModelLayout

POSITION_FREE = ("query", "key", "value")


def position_free(lay: ModelLayout, module: str) -> bool:
    """Whether the module's input is the same at every position: layer 0's query, key or
    value of a rotary model (no position embeddings)."""
    component, layer = lay.locate(module)
    return bool(lay.family.rotary) and layer == 0 and component in POSITION_FREE


class Orderer:
    """Orders of a token set for each sentence (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        last: LastTokens,
        tokens: torch.Tensor,
        beam: int,
        start: int,
        first_choices: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.last = last
        self.tokens = tokens  # the set (S,)
        self.beam = beam
        self.start = start  # a document-start token the probabilities are conditioned on
        # what the first position may hold: the set, or (a query's first token, which the
        # gradient does not see) these candidate ids
        self.free_first = first_choices is not None
        self.first_choices = tokens if first_choices is None else first_choices

    @torch.no_grad()
    def candidates(self, length: int, cover: bool) -> list[torch.Tensor]:
        """The `beam` likeliest sequences of `length` tokens from the set (every token used
        at least once when `cover`), likeliest first."""
        size = int(self.tokens.shape[0])
        start = torch.tensor([[self.start]], device=self.tokens.device)
        first = self.model(input_ids=start).logits[0, -1].double().log_softmax(-1)
        if self.free_first:  # the likeliest first tokens
            scores, top = first[self.first_choices].topk(min(self.beam, len(self.first_choices)))
            seqs = self.first_choices[top, None]
        else:  # every token of the set
            seqs, scores = self.tokens[:, None], first[self.tokens]
        for t in range(1, length):
            context = torch.cat([start.expand(len(seqs), 1), seqs], 1)
            logits = self.model(input_ids=context).logits[:, -1].double().log_softmax(-1)
            step = scores[:, None] + logits[:, self.tokens]  # (K, S)
            if cover:
                used = (seqs[:, :, None] == self.tokens).any(1)  # (K, S)
                unused = (~used).sum(1, keepdim=True) - (~used).long()  # after adding each
                step = step.masked_fill(unused > length - t - 1, float("-inf"))
            flat = step.flatten()
            take = flat.topk(min(self.beam, int(torch.isfinite(flat).sum()))).indices
            rows, cols = take // size, take % size
            seqs = torch.cat([seqs[rows], self.tokens[cols, None]], 1)
            scores = flat[take]
        return list(seqs[: self.beam])

    def misfit(self, batch: dict[int, torch.Tensor]) -> float:
        """The gradient residual of `batch` (visible tokens per sentence), the model's guesses
        standing in for the last tokens."""
        guesses = self.last.guesses(batch)
        return self.last.gradient_residual(
            [batch[b].tolist() + [guesses[b]] for b in sorted(batch)]
        )

    def order(self, lengths: list[int]) -> dict[int, torch.Tensor]:
        """Each sentence's visible tokens (its length minus the last): per sentence, the
        candidate whose batch gradient comes closest to the observed one."""
        from_set = lengths[0] - 1 - int(self.free_first)  # positions the set fills
        cover = len(lengths) == 1 and int(self.tokens.shape[0]) <= from_set
        options = {b: self.candidates(n - 1, cover) for b, n in enumerate(lengths) if n > 1}
        chosen = {b: c[0] for b, c in options.items()}
        for b, cands in options.items():  # one sentence at a time, the others fixed
            chosen[b] = min(cands, key=lambda c: self.misfit({**chosen, b: c}))
        return chosen
