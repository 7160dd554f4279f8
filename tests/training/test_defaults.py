"""The defaults a user who sets nothing gets: what is attacked, how often, for how long."""

from __future__ import annotations

import pytest
from conftest import make_tiny_model

from gradaudit import AuditConfig, Auditor
from gradaudit.training.config import DEFAULT_OUTPUT_DIR


def sampled(config: AuditConfig, last: int) -> list[int]:
    """The steps an auditor takes, counting its audits against max_audits."""
    taken: list[int] = []
    for step in range(1, last + 1):
        if config.is_sampled(step, audits_taken=len(taken)):
            taken.append(step)
    return taken


def test_defaults_audit_well_within_bounded_time():
    config = AuditConfig()
    assert config.attack == "auto" and config.modules == ["query@0"]
    assert config.max_audits == 8 and config.background and config.worker_threads == 1
    assert config.attack_timeout_s == 900 and config.close_timeout_s == 1800
    assert config.output_dir is None and not config.keep_snapshots


@pytest.mark.parametrize(
    ("last", "steps"),
    [
        (40, [1, 6, 11, 16, 21, 26, 31, 36]),  # spread over a run of known length
        (12, [1, 2, 3, 4, 5, 6, 7, 8]),
        (5, [1, 2, 3, 4, 5]),
        (None, [1, 101, 201, 301, 401, 501, 601, 701]),  # length unknown: every 100, 8 at most
    ],
)
def test_without_a_sampling_rule_the_audits_are_spread_over_the_run(last, steps):
    config = AuditConfig(attack=None).for_run(last)
    assert sampled(config, 2000 if last is None else last) == steps


def test_explicit_settings_are_kept():
    every = AuditConfig(every_n_steps=3, max_audits=None, attack="gradmatch", output_dir="x")
    run = every.for_run(40)
    assert (run.every_n_steps, run.output_dir, run.attack) == (3, "x", "gradmatch")
    assert sampled(run, 40) == list(range(1, 41, 3))
    listed = AuditConfig(steps=[2, 9], attack=None).for_run(40)
    assert listed.every_n_steps is None and sampled(listed, 40) == [2, 9]


def test_an_auditor_without_output_dir_writes_to_the_default_folder(
    tokenizer, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    model = make_tiny_model(tokenizer.vocab_size)
    auditor = Auditor(model, AuditConfig(attack=None, background=False), last_step=16)
    assert auditor.config.output_dir == DEFAULT_OUTPUT_DIR and auditor.config.every_n_steps == 2
    assert auditor.close().resolve() == tmp_path / DEFAULT_OUTPUT_DIR / "report.json"
