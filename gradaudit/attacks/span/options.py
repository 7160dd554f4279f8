"""Options of the span attack: every number it uses, checked."""

from __future__ import annotations

from dataclasses import dataclass

from gradaudit.attacks.precision import ROUGH_CHOICES
from gradaudit.errors import GradAuditError

SATURATED_CHOICES = ("stop", "gradmatch")


@dataclass
class SpanOptions:
    """Numbers the span attack uses (their roles: docs/span-method.md); checked when built."""

    chunk: int = 4096
    min_gap: float = 50.0
    pool_extra: int = 1
    sweeps: int = 3
    forward_batch: int = 32
    deep_steps: int = 300  # Adam steps per restart at budget 1
    deep_restarts: int = 4  # continuous starts; the best 2 are searched while unsolved
    deep_lr: float = 0.05  # first start's step, x the embeddings' spread; the last one's is 4x
    deep_neighbours: int = 64  # nearest tokens each position tries
    deep_bag: int = 8  # nearest tokens of each position that every position also tries
    deep_linearised: int = 32  # tokens per position ranked by the score's gradient, each sweep
    deep_screen: int = 32  # of the nearest and bag tokens, tried per position (0: all)
    deep_inserts: int = 16  # tokens tried as an insertion that shifts its sentence
    deep_sweeps: int = 20  # coordinate-descent sweeps at budget 1
    deep_moves: int = 1024  # reorderings (swaps, moves of a token) tried per sweep
    # Wall-clock seconds of deep mode's search at budget 1 (0: no limit). Past them every
    # stage returns its best batch so far, and the result says it ran out of time.
    deep_seconds: float = 600.0
    # Deep mode ranks candidates with a copy of the model in this dtype and scores only the
    # best few at full precision: "auto" is bfloat16 where the device computes it natively
    # (where emulated it is slower), "none" scores all at full precision.
    rough_dtype: str = "auto"
    # Partial regime (r below the tokens), unsolved: sweeps (at budget 1) of token swaps kept
    # where the gradient's cosine improves (deep/polish.py); 0 turns it off.
    polish_sweeps: int = 40
    gradient_check: bool = True
    saturated: str = "stop"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.saturated not in SATURATED_CHOICES:
            raise GradAuditError(
                f"saturated={self.saturated!r}: choose one of {', '.join(SATURATED_CHOICES)}"
            )
        counts = ("chunk", "forward_batch", "deep_restarts", "deep_neighbours", "deep_sweeps")
        for name in counts:
            if getattr(self, name) < 1:
                raise GradAuditError(f"{name} must be at least 1")
        sizes = ("deep_steps", "deep_bag", "deep_linearised", "deep_screen", "deep_inserts")
        for name in (*sizes, "deep_moves", "polish_sweeps", "deep_seconds"):
            if getattr(self, name) < 0:
                raise GradAuditError(f"{name} must be at least 0")
        if self.rough_dtype not in ROUGH_CHOICES:
            choices = ", ".join(ROUGH_CHOICES)
            raise GradAuditError(f"rough_dtype={self.rough_dtype!r}: choose one of {choices}")
