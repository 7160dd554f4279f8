"""Damaged, incomplete or foreign snapshot files: one clear error naming the directory."""

from __future__ import annotations

import json

import pytest

from gradaudit import GradAuditError, GradientSnapshot, capture, select_modules
from gradaudit.model.batch import make_batch


@pytest.fixture
def saved(tiny_model, tiny_tokenizer, tmp_path):
    batch = make_batch(tiny_model, tiny_tokenizer, ["a charming film"], [1])
    capture(tiny_model, batch, select_modules(tiny_model, "value@0")).save(tmp_path / "snap")
    return tmp_path / "snap"


def _edit_sidecar(directory, **changes):
    path = directory / "snapshot.json"
    info = json.loads(path.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))


def _truncate(directory):
    path = directory / "gradients.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _break_json(directory):
    (directory / "snapshot.json").write_text('{"version": 1, "modules": [')


def _drop_key(directory):
    path = directory / "snapshot.json"
    info = json.loads(path.read_text())
    del info["config_hash"]
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, "damaged or incomplete"),
        (_break_json, "damaged or incomplete"),
        (_drop_key, "damaged or incomplete"),
        (lambda d: _edit_sidecar(d, version=99), "format version 99"),
        (lambda d: _edit_sidecar(d, modules=["bert.pooler.dense"]), "holds no gradient"),
    ],
    ids=["truncated-tensors", "broken-json", "missing-key", "newer-version", "edited-modules"],
)
def test_a_damaged_snapshot_is_one_error_naming_its_directory(saved, damage, message):
    damage(saved)
    with pytest.raises(GradAuditError, match=message) as error:
        GradientSnapshot.load(saved)
    assert str(saved) in str(error.value)


def test_an_intact_snapshot_still_loads(saved, tiny_model):
    assert GradientSnapshot.load(saved, tiny_model).modules == [
        "bert.encoder.layer.0.attention.self.value"
    ]
