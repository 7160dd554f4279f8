"""pytest plugin (entry point `pytest11`): the `gradaudit_audit` fixture and its options.

Leakage assertions live in the core (`gradaudit.assert_no_leakage`, `gradaudit.assert_leaks`)
and raise AssertionError with their own multi-line message, so they need no assertion
rewriting. gradaudit itself (torch, transformers) is imported only when the fixture is used,
so the plugin costs nothing in test runs that do not audit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gradaudit import AuditResult

AuditFunction = Callable[..., "AuditResult"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradaudit", "gradaudit leakage audits")
    group.addoption(
        "--gradaudit-device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)"
    )
    group.addoption(
        "--gradaudit-budget",
        type=float,
        default=1.0,
        help="attack budget, scales step counts (default: 1.0, the published settings)",
    )
    group.addoption(
        "--gradaudit-attack", default="gradmatch", help="attack name (default: gradmatch)"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gradaudit: a gradient-leakage audit (runs an inversion attack; slow)"
    )


@pytest.fixture
def gradaudit_audit(request: pytest.FixtureRequest) -> AuditFunction:
    """`audit(model, tokenizer, texts, labels, modules, **options) -> AuditResult`.

    Attack, budget and device come from `--gradaudit-attack/-budget/-device`; keyword
    arguments `attack`, `budget`, `device` or `seed` in the call override them, and all
    other keywords are attack options.
    """
    from gradaudit import audit_batch

    config = request.config

    def audit(
        model: Any,
        tokenizer: Any,
        texts: Sequence[str],
        labels: Sequence[int],
        modules: str | Iterable[str],
        **options: Any,
    ) -> AuditResult:
        attack = options.pop("attack", config.getoption("gradaudit_attack"))
        budget = options.pop("budget", config.getoption("gradaudit_budget"))
        device = options.pop("device", config.getoption("gradaudit_device"))
        seed = options.pop("seed", 0)
        return audit_batch(
            model, tokenizer, texts, labels, modules, attack,
            seed=seed, device=device, budget=budget, **options,
        )  # fmt: skip

    return audit
