"""Options of the causal attack: every number it uses, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, fields

from gradaudit.errors import GradAuditError

LAST_CHOICES = ("gradient", "model", "none")


@dataclass
class CausalOptions:
    """Numbers the causal attack uses (their roles: docs/span-method.md, "Decoders").

    `screen` tokens per prefix are checked exactly after the first-order screen, `rounds`
    times at most (each round linearises again at the best token checked so far); `beam`
    prefixes per sentence survive a position; the `frequent` lowest ids (a BPE's commonest
    tokens, which first order ranks poorly) are checked exactly in the first round too; a
    token fits when its input's residual against the row space is below `tol` and within
    `ratio` of the best fit at that prefix. Position 0 (no prefix) is checked exactly on the
    whole vocabulary, once for all sentences.
    """

    min_gap: float = 50.0  # spectrum: the rank gap (see gradients.spectrum)
    screen: int = 64
    frequent: int = 1024  # lowest-id tokens also checked exactly in the first round
    rounds: int = 4
    sketch: int = 128  # random directions of the screen's Jacobian sketch (more: exact)
    beam: int = 8
    tol: float = 2e-3
    ratio: float = 1000.0
    forward_batch: int = 256  # candidate rows per forward pass (speed and memory only)
    last: str = "gradient"  # the invisible last token: gradient match, the model's guess, none

    def __post_init__(self) -> None:
        if self.last not in LAST_CHOICES:
            raise GradAuditError(
                f"causal option last must be one of {', '.join(LAST_CHOICES)}, got {self.last!r}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "last" and not value > 0:
                raise GradAuditError(f"causal option {f.name} must be > 0, got {value}")
