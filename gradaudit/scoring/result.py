"""`AuditResult`: the scores of one attacked batch, with what was attacked and how."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gradaudit.errors import GradAuditError

# `info` entries that hold the batch's tokens (a decoder's layer-0 token set): training text in
# token form, which redaction removes with the text.
TOKEN_INFO = ("token_set",)


def redacted_audit(audit: dict[str, Any]) -> dict[str, Any]:
    """An audit's fields (as a dict) without its text: no references, reconstructions, nor
    the `info` entries that hold the batch's tokens (`TOKEN_INFO`)."""
    info = {k: v for k, v in (audit.get("info") or {}).items() if k not in TOKEN_INFO}
    return {**audit, "references": [], "reconstructions": [], "info": info, "redacted": True}


THREAT_MODEL = (
    "white-box adversary: knows the model weights at the audited step, the labels and the "
    "sequence lengths of the batch, and observes the gradients of the audited modules only"
)


@dataclass
class AuditResult:
    """Scores of one attacked batch, with its references and reconstructions."""

    modules: list[str]
    attack: str
    batch_size: int
    references: list[str] = field(default_factory=list)
    reconstructions: list[str] = field(default_factory=list)
    rouge1: float | None = None
    rouge2: float | None = None
    rougeL: float | None = None
    token_recall: float | None = None
    exact: float | None = None
    batch_rouge1: float | None = None
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    gradient: str = "raw"
    step: int | None = None
    sentences: list[dict[str, Any]] = field(default_factory=list)
    metric_config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    epsilon: float | None = None
    redacted: bool = False

    @property
    def contrast(self) -> bool:
        """Whether this audit attacked a never-released gradient shown only for contrast.

        (The raw gradient behind a DP-SGD release, `AuditConfig.dp_contrast`.) Verdicts
        (report summary, worst case, assertions) leave it out.
        """
        return bool(self.info.get("contrast"))

    @property
    def unattacked_reason(self) -> str | None:
        """Why the attack attacked nothing, or None when it ran.

        An attack that cannot use a gradient (span on a saturated, rank-limited or zero
        gradient) says so as `info["mode"] == "none"` with `info["why"]`, or
        `info["attacked"] is False`: its blank guess is not a measurement of leakage.
        """
        info = self.info or {}
        if info.get("attacked") is False or info.get("mode") == "none":
            return str(info.get("why") or "the attack found nothing it could attack")
        return None

    def redact(self) -> AuditResult:
        """A copy without text (nor the tokens `info` may hold): scores, lengths and counts."""
        return AuditResult(**redacted_audit(asdict(self)))

    @classmethod
    def failure(
        cls, modules: list[str], attack: str, batch_size: int, error: str, **fields: Any
    ) -> AuditResult:
        """A result without scores: `error` says why the audit did not run."""
        return cls(
            modules=list(modules), attack=attack, batch_size=batch_size, error=error, **fields
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditResult:
        """The result an audit dict of a report holds; unknown fields are a clear error."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise GradAuditError(
                f"an audit holds field(s) {', '.join(unknown)} that this gradaudit does not "
                "know: the report was written by a newer version; upgrade gradaudit"
            )
        return cls(**data)
