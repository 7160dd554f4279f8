"""What a saturated layer-0 gradient still says, and what it does not, stated plainly.

When a batch's distinct inputs reach the module's width the row space is everything: the span
test constrains nothing, and the attack's low score must not read as "safe". In eval mode the
inputs are (word + slot) / sigma + beta, so the rank stays below words + slots + 1; with
dropout every token has its own input and the span fills at as many tokens as the width.
"""

from __future__ import annotations

from typing import Any

import torch

from gradaudit.gradients.spectrum import Spectrum


def saturation_statement(
    spec: Spectrum, batch: dict[str, torch.Tensor], train_mode: bool
) -> dict[str, Any]:
    """The `saturation` record of a saturated layer-0 query/key/value gradient."""
    mask = batch["attention_mask"]
    tokens = int(mask.sum())
    lengths = [int(n) for n in mask.sum(1)]
    cause = (
        f"with dropout every token has its own input: {tokens} inputs for width {spec.width}"
        if train_mode
        else f"{tokens} tokens' distinct (word, slot) inputs span all {spec.width} dimensions"
    )
    fits = max(1, (spec.width - 1) // max(1, max(lengths)))
    return {
        "inputs": tokens,
        "width": spec.width,
        "cause": cause,
        "identified": {"sentence_lengths": lengths, "tokens": tokens},
        "not_identified": ["words", "their positions", "their sentences"],
        "statement": (
            "saturated: this gradient's row space is the whole input space, so it identifies "
            "no word; the score is not evidence that the batch is safe. The same sentences in "
            f"batches of at most {fits} (width / longest sentence) would be recovered exactly "
            "from this module"
        ),
    }
