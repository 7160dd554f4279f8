"""Options of the causal attack: every number it uses, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, fields

from gradaudit.attacks.precision import ROUGH_CHOICES
from gradaudit.errors import GradAuditError

LAST_CHOICES = ("gradient", "model", "none")


@dataclass
class CausalOptions:
    """Numbers the causal attack uses (their roles: docs/span-method.md, "Decoders").

    After a prefix, the `screen` tokens the regression fitted one position earlier puts
    nearest the row space are checked exactly; if none fits, a causal LM's own `guesses`
    likeliest next tokens (`screen` of them first) and the tokens the beams hold, then the
    `frequent` lowest ids (a BPE's commonest tokens, also the guesses for a blind first token)
    and `sample` random others, then `rounds` rounds of the nearest by the refitted regression
    (`screen` tokens, doubling each round), and the rest of the vocabulary when still none
    fits. A token fits
    when its input's residual against the row space is below `tol` and within `ratio` of the
    best fit at that prefix; `beam` prefixes per sentence (plus one per other sentence)
    survive a position. Position 0 (no prefix) is checked exactly on the whole vocabulary,
    once for all sentences. A query's blind first token is searched behind second tokens
    ranked after `stand_ins` stand-in first tokens (common word tokens), from a sample of
    about `pair_sample` tokens (see `pairs`).
    """

    min_gap: float = 50.0  # spectrum: the rank gap (see gradients.spectrum)
    screen: int = 64
    frequent: int = 1024
    sample: int = 1024
    rounds: int = 4
    guesses: int = 256  # a causal LM's likeliest next tokens checked before the sample; 0: none
    stand_ins: int = 16
    pair_sample: int = 512
    beam: int = 8
    order_beam: int = 16  # orders kept per sentence where the module input is position-free
    tol: float = 2e-3
    ratio: float = 1000.0
    forward_batch: int = 256  # candidate rows per forward pass (speed and memory only)
    # Candidates are checked first by a copy of the model in this dtype, and only those that
    # may fit again at full precision: "auto" is bfloat16 where the device computes it
    # natively (where emulated it is slower), "none" checks every candidate at full precision.
    rough_dtype: str = "auto"
    last: str = "gradient"  # the invisible last token: gradient match, the model's guess, none

    def __post_init__(self) -> None:
        if self.rough_dtype not in ROUGH_CHOICES:
            raise GradAuditError(
                f"causal option rough_dtype must be one of {', '.join(ROUGH_CHOICES)}, got "
                f"{self.rough_dtype!r}"
            )
        if self.last not in LAST_CHOICES:
            raise GradAuditError(
                f"causal option last must be one of {', '.join(LAST_CHOICES)}, got {self.last!r}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "guesses" and value < 0:
                raise GradAuditError(f"causal option guesses must be >= 0, got {value}")
            if f.name not in ("last", "rough_dtype", "guesses") and not value > 0:
                raise GradAuditError(f"causal option {f.name} must be > 0, got {value}")
