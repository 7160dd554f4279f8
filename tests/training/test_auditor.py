"""The core Auditor in a plain torch loop: config, sampling, capture, attacks, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from _tiny import TinyTexts, read_audits, tiny_config
from conftest import make_tiny_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from gradaudit import AuditConfig, Auditor, GradAuditError, GradientSnapshot
from gradaudit.attacks.gradmatch import GradMatchAttack
from gradaudit.attacks.registry import register_attack
from gradaudit.model.batch import concat_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def train(model, tokenizer, auditor_config=None, *, steps=6, accumulation=1, clip=None):
    """A plain loop: AdamW, batch 4, optional accumulation and clipping; returns the batches."""
    loader = DataLoader(
        TinyTexts(tokenizer, 4 * steps * accumulation),
        batch_size=4,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    auditor = None
    if auditor_config is not None:
        auditor = Auditor(
            model, auditor_config, tokenizer=tokenizer, optimizer=optimizer, max_grad_norm=clip
        )
    batches = []
    for i, batch in enumerate(loader):
        batches.append(dict(batch))
        (model(**batch).loss / accumulation).backward()
        if (i + 1) % accumulation == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
    if auditor is not None:
        auditor.close()
    return batches


def test_config_round_trips_through_yaml_and_json(tmp_path):
    config = AuditConfig(modules="query@0", steps=[4, 2], probability=0.5, attack=None)
    assert config.modules == ["query@0"] and config.steps == [2, 4]
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    assert AuditConfig.from_file(tmp_path / "c.json") == config
    (tmp_path / "c.yaml").write_text("modules: [key@1]\nevery_n_steps: 10\nbackground: false\n")
    loaded = AuditConfig.load(tmp_path / "c.yaml")
    assert loaded.modules == ["key@1"] and loaded.every_n_steps == 10 and not loaded.background
    with pytest.raises(GradAuditError, match="unknown AuditConfig key.*every_n"):
        AuditConfig.from_dict({"every_n": 3})
    with pytest.raises(GradAuditError, match="unknown attack"):
        AuditConfig(attack="nope")
    with pytest.raises(GradAuditError, match="probability"):
        AuditConfig(probability=1.5)


def test_sampling_rules():
    default = AuditConfig()  # no rule given: the default cadence, unless the run's length is known
    assert default.every_n_steps is None and default.for_run().every_n_steps == 100
    every = AuditConfig(every_n_steps=5, first_step=3, attack=None)
    assert [s for s in range(1, 20) if every.is_sampled(s)] == [3, 8, 13, 18]
    listed = AuditConfig(steps=[2, 9], attack=None)
    assert [s for s in range(1, 20) if listed.is_sampled(s)] == [2, 9]
    capped = AuditConfig(every_n_steps=1, max_audits=2, attack=None)
    assert capped.is_sampled(5, audits_taken=1) and not capped.is_sampled(5, audits_taken=2)
    drawn = AuditConfig(probability=0.3, seed=7, attack=None)
    picks = [s for s in range(1, 1001) if drawn.is_sampled(s)]
    assert picks == [s for s in range(1, 1001) if drawn.is_sampled(s)]  # same draws again
    assert 230 < len(picks) < 370
    state = torch.random.get_rng_state()
    drawn.is_sampled(3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_concat_batches_pads_micro_batches_to_one_length():
    a = {"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.ones(1, 3, dtype=int)}
    b = {
        "input_ids": torch.tensor([[2, 5, 6, 7, 3]]),
        "attention_mask": torch.ones(1, 5, dtype=int),
    }
    a["labels"], b["labels"] = torch.tensor([1]), torch.tensor([0])
    out = concat_batches([a, b], pad_token_id=0)
    assert out["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 6, 7, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [1, 0]


def test_snapshot_holds_the_step_batch_and_its_applied_gradient(tokenizer, tmp_path):
    """With accumulation 2 and clipping, the snapshot is the clipped gradient of both halves."""
    model = no_dropout(make_tiny_model(tokenizer.vocab_size))
    config = tiny_config(tmp_path, steps=[2], attack=None)
    batches = train(model, tokenizer, config, steps=3, accumulation=2, clip=1e-3)
    (audit,) = read_audits(tmp_path)
    assert (audit["step"], audit["batch_size"], audit["gradient"]) == (2, 8, "clipped")
    assert audit["info"]["micro_batches"] == 2 and audit["error"].startswith("not attacked")
    snapshot = GradientSnapshot.load(tmp_path / "snapshots" / "step-00000002", model)
    expected = concat_batches(batches[2:4])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(snapshot.batch[key], expected[key])
    # Recompute the step's gradient from the snapshot's weights: the mean loss of both halves.
    replay = make_tiny_model(tokenizer.vocab_size)
    replay.load_state_dict(snapshot.weights)
    no_dropout(replay)
    loss = sum(replay(**b).loss for b in batches[2:4]) / 2
    names = [n for n, _ in replay.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(replay.parameters()))))
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    module = snapshot.modules[0]
    expected_grad = grads[f"{module}.weight"] * min(1.0, 1e-3 / (norm + 1e-6))
    torch.testing.assert_close(snapshot.weight_gradient(module), expected_grad)


def test_inline_attacks_score_sampled_steps_and_free_snapshots(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer.vocab_size).train()
    train(model, tokenizer, tiny_config(tmp_path, every_n_steps=3), steps=6)
    audits = read_audits(tmp_path)
    assert [a["step"] for a in audits] == [1, 4]
    for audit in audits:
        assert audit["error"] is None and audit["attack"] == "gradmatch"
        assert 0 <= audit["rouge1"] <= 1 and len(audit["reconstructions"]) == 4
        assert audit["gradient"] == "raw" and audit["epsilon"] is None
    assert not list((tmp_path / "snapshots").iterdir())  # keep_snapshots=False
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["every_n_steps"] == 3 and (tmp_path / "report.md").is_file()
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o600


class RaisingAttack(GradMatchAttack):
    """An attack that fails at every snapshot (a CUDA device that is missing is refused when
    the config is built, so it cannot make attacks fail any more)."""

    name = "raising"

    def _reconstruct(self, *args, **kwargs):
        raise RuntimeError("the attack broke")


def test_failing_attack_is_recorded_and_training_goes_on(tokenizer, tmp_path):
    register_attack("raising", RaisingAttack)
    model = make_tiny_model(tokenizer.vocab_size).train()
    train(model, tokenizer, tiny_config(tmp_path, every_n_steps=2, attack="raising"), steps=4)
    audits = read_audits(tmp_path)
    assert [a["step"] for a in audits] == [1, 3]
    assert all("RuntimeError: the attack broke" in a["error"] for a in audits)
    assert all(a["rouge1"] is None for a in audits)
    # A failed attack deletes its snapshot (it holds the batch's text) unless keep_snapshots.
    assert not any(Path(a["info"]["snapshot"]).exists() for a in audits)
    assert all("its snapshot was deleted" in a["error"] for a in audits)


def test_keep_snapshots_keeps_a_failed_attacks_snapshot_for_a_retry(tokenizer, tmp_path):
    register_attack("raising", RaisingAttack)
    model = make_tiny_model(tokenizer.vocab_size).train()
    config = tiny_config(tmp_path, steps=[1], attack="raising", keep_snapshots=True)
    train(model, tokenizer, config, steps=1)
    (audit,) = read_audits(tmp_path)
    assert Path(audit["info"]["snapshot"]).is_dir()
    assert "its snapshot is kept" in audit["error"] and "gradaudit attack" in audit["error"]


def test_background_worker_matches_inline_and_times_out(tokenizer, tmp_path):
    """Same seed, same scores off the training path; a too-short timeout is an audit error."""
    inline, background = tmp_path / "inline", tmp_path / "background"
    train(make_tiny_model(tokenizer.vocab_size).train(), tokenizer, tiny_config(inline), steps=6)
    config = tiny_config(background, steps=[1, 6], background=True)
    train(make_tiny_model(tokenizer.vocab_size).train(), tokenizer, config, steps=6)
    (a,) = read_audits(inline)[:1]
    b, c = read_audits(background)
    assert (b["step"], b["rouge1"], b["reconstructions"]) == (1, a["rouge1"], a["reconstructions"])
    assert c["step"] == 6 and c["error"] is None
    slow = tiny_config(tmp_path / "slow", steps=[2], background=True, budget=1.0)
    slow.attack_timeout_s = 0.05
    train(make_tiny_model(tokenizer.vocab_size).train(), tokenizer, slow, steps=3)
    (timed_out,) = read_audits(tmp_path / "slow")
    assert "timed out after 0.05 s" in timed_out["error"]


def test_redacted_report_has_no_text(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer.vocab_size).train()
    train(model, tokenizer, tiny_config(tmp_path, steps=[1], redact=True), steps=1)
    text = (tmp_path / "report.json").read_text()
    (audit,) = json.loads(text)["audits"]
    assert audit["redacted"] and audit["references"] == [] and "movie" not in text


def test_bad_input_fails_before_training(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer.vocab_size).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradAuditError, match="matches no module"):
        Auditor(model, tiny_config(tmp_path, modules=["nope.*"]), tokenizer=tokenizer)
    with pytest.raises(GradAuditError, match="register_step_pre_hook"):
        Auditor(model, tiny_config(tmp_path), tokenizer=tokenizer, optimizer=object())
    with pytest.raises(GradAuditError, match="needs the tokenizer"):
        Auditor(model, tiny_config(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(GradAuditError, match="not writable"):
        Auditor(model, tiny_config(tmp_path / "file" / "out"), tokenizer=tokenizer)
    with pytest.warns(UserWarning, match="select no step"):
        config = tiny_config(tmp_path, steps=[5], attack=None)
        Auditor(model, config, last_step=3).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auditor = Auditor(model, tiny_config(tmp_path), tokenizer=tokenizer, optimizer=optimizer)
    batch = tokenizer(["the movie"], return_tensors="pt")
    # The auditor never breaks a training forward: it says once why it cannot audit it.
    with pytest.warns(RuntimeWarning, match="batch lacks labels.*training goes on"):
        assert model(**batch).logits.shape == (1, 2)
    auditor.close()


def test_each_module_is_attacked_on_its_own_unless_joined(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer.vocab_size).train()
    modules = ["query@0", "ffn_in@1"]
    train(model, tokenizer, tiny_config(tmp_path / "a", steps=[2], modules=modules), steps=3)
    audits = read_audits(tmp_path / "a")
    assert [(a["step"], a["modules"]) for a in audits] == [
        (2, ["bert.encoder.layer.0.attention.self.query"]),
        (2, ["bert.encoder.layer.1.intermediate.dense"]),
    ]
    assert all(a["error"] is None for a in audits)
    assert not list((tmp_path / "a" / "snapshots").iterdir())  # freed after the last module
    joined = tiny_config(tmp_path / "b", steps=[2], modules=modules, separate_modules=False)
    train(make_tiny_model(tokenizer.vocab_size).train(), tokenizer, joined, steps=3)
    assert [len(a["modules"]) for a in read_audits(tmp_path / "b")] == [2]
