"""Privacy accounting: ε of DP-SGD and the assumptions behind it, in words.

Pure analysis: parameter checks, ε from an Opacus accountant (given σ, q and steps, or read
from a live engine's accountant) and a JSON-ready statement of what that ε covers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from opacus.accountants import create_accountant

from gradaudit.errors import GradAuditError
from gradaudit.report.format import number

ACCOUNTANTS = ("rdp", "prv")
SAMPLINGS = ("poisson", "shuffled")


def check_dp_parameters(
    *,
    noise_multiplier: float | None = None,
    clip: float | None = None,
    sample_rate: float | None = None,
    delta: float | None = None,
    steps: int | None = None,
    accountant: str | None = None,
) -> None:
    """Raise a GradAuditError naming the fix for each DP-SGD parameter given and out of range."""
    if noise_multiplier is not None and not (
        noise_multiplier >= 0 and math.isfinite(noise_multiplier)
    ):
        raise GradAuditError(
            f"noise multiplier σ = {noise_multiplier} is invalid: use σ ≥ 0 (0 means no noise)"
        )
    if clip is not None and not (clip > 0 and math.isfinite(clip)):
        raise GradAuditError(
            f"clipping norm C = {clip} is invalid: use a positive per-example bound, e.g. 1.0"
        )
    if sample_rate is not None and not 0 < sample_rate <= 1:
        raise GradAuditError(
            f"sample rate q = {sample_rate} is outside (0, 1]: use the expected batch size "
            "divided by the data set size"
        )
    if delta is not None and not 0 < delta < 1:
        raise GradAuditError(
            f"δ = {delta} is outside (0, 1): use a small positive value, at most 1/N for N "
            "training examples"
        )
    if steps is not None and (int(steps) != steps or steps < 0):
        raise GradAuditError(f"steps = {steps} is invalid: use a whole number ≥ 0")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise GradAuditError(
            f"accountant {accountant!r} is not supported: choose one of {', '.join(ACCOUNTANTS)}"
        )


def default_delta(dataset_size: int) -> float:
    """δ = 1/N for a data set of N examples (N ≥ 2)."""
    if dataset_size < 2:
        raise GradAuditError(
            f"cannot derive δ = 1/N from a data set of {dataset_size} example(s): pass δ"
        )
    return 1.0 / dataset_size


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps, from an Opacus accountant (∞ when σ = 0).

    A negative value from the RDP conversion is reported as 0, which it implies.
    """
    check_dp_parameters(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        delta=delta,
        steps=steps,
        accountant=accountant,
    )
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return max(0.0, float(acc.get_epsilon(delta=delta)))


def _accountant(privacy_engine: Any) -> Any:
    # A PrivacyEngine keeps its accountant as `.accountant`; dp-transformers' Trainer exposes
    # the Opacus accountant itself. Either one counts the steps its DPOptimizer takes.
    return getattr(privacy_engine, "accountant", privacy_engine)


def engine_epsilon(privacy_engine: Any, delta: float) -> float:
    """ε spent so far by an Opacus `PrivacyEngine` (or accountant), from its accountant.

    A negative value from the RDP conversion is reported as 0.
    """
    check_dp_parameters(delta=delta)
    accountant = _accountant(privacy_engine)
    if len(accountant) == 0:
        return 0.0
    return max(0.0, float(accountant.get_epsilon(delta)))


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return number(low, 4) if low == high else f"{number(low, 4)}–{number(high, 4)}"


def privacy_statement(
    *,
    noise_multiplier: float | Sequence[float],
    sample_rate: float | Sequence[float],
    steps: int,
    delta: float,
    accountant: str = "rdp",
    clip: float | None = None,
    sampling: str = "poisson",
    dataset_size: int | None = None,
    epsilon_value: float | None = None,
    source: str = "computed",
) -> dict[str, Any]:
    """ε with the assumptions behind it in words (TF Privacy's statement style), JSON-ready.

    `epsilon_value` is the engine's own ε when it ran (source "engine"); otherwise ε is
    computed from σ, q and steps (which then must be single numbers).
    """
    if sampling not in SAMPLINGS:
        raise GradAuditError(f"sampling {sampling!r} is not one of {', '.join(SAMPLINGS)}")
    sigmas = [noise_multiplier] if isinstance(noise_multiplier, (int, float)) else noise_multiplier
    rates = [sample_rate] if isinstance(sample_rate, (int, float)) else sample_rate
    sigmas, rates = [float(s) for s in sigmas], [float(q) for q in rates]
    for s in sigmas:
        check_dp_parameters(noise_multiplier=s)
    for q in rates:
        check_dp_parameters(sample_rate=q)
    check_dp_parameters(clip=clip, delta=delta, steps=steps, accountant=accountant)
    if epsilon_value is None:
        if len(sigmas) != 1 or len(rates) != 1:
            raise GradAuditError("pass epsilon_value when σ or q changed during training")
        epsilon_value = epsilon(sigmas[0], rates[0], steps, delta, accountant)
    lines = _statement_lines(
        sigmas, rates, steps, delta, accountant, clip, sampling, dataset_size, epsilon_value, source
    )
    return {
        "epsilon": epsilon_value,
        "delta": delta,
        "accountant": accountant,
        "source": source,
        "noise_multiplier": sigmas[0] if len(sigmas) == 1 else sigmas,
        "sample_rate": rates[0] if len(rates) == 1 else rates,
        "steps": int(steps),
        "clip": clip,
        "sampling": sampling,
        "unit": "example",
        "adjacency": "add-or-remove-one",
        "dataset_size": dataset_size,
        "statement": " ".join(lines),
    }


def _statement_lines(
    sigmas: list[float],
    rates: list[float],
    steps: int,
    delta: float,
    accountant: str,
    clip: float | None,
    sampling: str,
    dataset_size: int | None,
    epsilon_value: float,
    source: str,
) -> list[str]:
    """The sentences of a privacy statement: the mechanism, then what ε covers and assumes."""
    data = f" over {dataset_size} examples" if dataset_size else ""
    clipping = f", per-example clipping norm C = {number(clip, 4)}" if clip is not None else ""
    lines = [
        f"DP-SGD{data} with noise multiplier σ = {_range(sigmas)}{clipping} and sampling rate "
        f"q = {_range(rates)}, for {steps} steps.",
    ]
    if max(sigmas) == 0 and steps > 0:
        return [
            *lines,
            "σ = 0: no noise is added, so there is no differential privacy guarantee (ε = ∞); "
            "clipping alone bounds each example's influence but hides nothing.",
        ]
    run = " of the training run" if source == "engine" else ""
    return [
        *lines,
        f"Example-level DP with add-or-remove-one adjacency at δ = {delta:.3g}, computed "
        f"with Opacus's {accountant.upper()} accountant{run}: ε = {number(epsilon_value, 4)}.",
        "It covers every gradient released in those steps, and so any part of them (a "
        "partial gradient is post-processing of the release).",
        "It assumes each example joins each batch independently with probability q."
        if sampling == "poisson"
        else "The data were shuffled into fixed-size batches, not Poisson-sampled: this ε is "
        "what Poisson sampling would give, believed close but not a proven bound for "
        "shuffling.",
        "No user-level guarantee: someone with k examples in the data is protected only by "
        "group privacy, roughly k·ε.",
    ]


def engine_statement(
    privacy_engine: Any,
    delta: float,
    *,
    clip: float | None = None,
    sampling: str = "poisson",
    dataset_size: int | None = None,
) -> dict[str, Any]:
    """`privacy_statement` of an Opacus `PrivacyEngine` (or accountant), with its own ε."""
    accountant = _accountant(privacy_engine)
    history = list(accountant.history)
    return privacy_statement(
        noise_multiplier=[h[0] for h in history] or [0.0],
        sample_rate=[h[1] for h in history] or [1.0],
        steps=sum(int(h[2]) for h in history),
        delta=delta,
        accountant=accountant.mechanism(),
        clip=clip,
        sampling=sampling,
        dataset_size=dataset_size,
        epsilon_value=engine_epsilon(privacy_engine, delta),
        source="engine",
    )
