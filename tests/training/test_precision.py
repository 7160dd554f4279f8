"""Mixed precision: the rank floor of the precision a gradient was computed in, recorded;
an attack that attacked nothing never counts as "no leakage" (issue 28, defect 5)."""

from __future__ import annotations

import pytest
import torch
from _tiny import TinyTexts, final_weights, read_audits, tiny_config
from conftest import make_tiny_model
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from gradaudit import Auditor, GradientSnapshot, assert_leaks, assert_no_leakage
from gradaudit.gradients.spectrum import gradient_precision, spectrum
from gradaudit.scoring.result import AuditResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def low_rank(rank: int = 4, size: int = 48, weakest: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(size, rank, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(size, rank, generator=generator))
    values = torch.logspace(0, torch.log10(torch.tensor(weakest)), rank)
    return (left @ torch.diag(values) @ right.T).float()


def test_rank_floor_is_that_of_the_precision_computed_in():
    grad = low_rank()
    rounded = grad.bfloat16().float()  # a bf16 autocast gradient in a float32 .grad
    assert gradient_precision(grad) == torch.float32
    assert gradient_precision(rounded) == torch.bfloat16
    assert gradient_precision(grad.half().float()) == torch.float16
    found = spectrum(rounded)
    assert (found.precision, found.rank, found.status) == ("bfloat16", 4, "ok")
    assert found.summary()["relative_floor"] == 2**-7
    assert spectrum(rounded, precision="float32").floor == pytest.approx(
        2**-23 * found.floor / 2**-7
    )
    # Directions weaker than bfloat16's rounding leave no gap above it: nothing to use.
    weak = low_rank(rank=20, weakest=1e-3).bfloat16().float()
    assert (spectrum(weak).status, spectrum(low_rank(rank=20, weakest=1e-3)).status) == (
        "saturated",
        "ok",
    )


def train_autocast(model, tokenizer, config=None, *, steps=3):
    """A plain loop under CPU float16 autocast (float32 weights and .grad), clipped (so the
    gradient's values are float16 numbers times a float32 factor)."""
    loader = DataLoader(
        TinyTexts(tokenizer, 4 * steps), batch_size=4, collate_fn=DataCollatorWithPadding(tokenizer)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    auditor = None if config is None else Auditor(model, config, optimizer=optimizer)
    for batch in loader:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        optimizer.step()
        optimizer.zero_grad()
    if auditor is not None:
        auditor.close()


def test_autocast_gradient_is_kept_at_its_precision_and_training_is_unchanged(tokenizer, tmp_path):
    plain = make_tiny_model(tokenizer.vocab_size).train()
    train_autocast(plain, tokenizer)
    audited = make_tiny_model(tokenizer.vocab_size).train()
    config = tiny_config(tmp_path, steps=[2], attack=None, keep_snapshots=True)
    train_autocast(audited, tokenizer, config)
    expected, got = final_weights(plain), final_weights(audited)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    (audit,) = read_audits(tmp_path)
    assert audit["info"]["precision"] == "float16"
    snapshot = GradientSnapshot.load(tmp_path / "snapshots" / "step-00000002")
    (module,) = snapshot.modules
    assert snapshot.meta["precision"] == {module: "float16"}
    grad = snapshot.weight_gradient(module)  # float32 holding float16 numbers
    assert grad.dtype == torch.float32 and torch.equal(grad.half().float(), grad)


def test_an_audit_that_attacked_nothing_fails_both_assertions():
    blank = AuditResult(
        modules=["q"], attack="span", batch_size=1, rouge1=0.0, rouge2=0.0, rougeL=0.0,
        token_recall=0.0, exact=0.0,
        info={"mode": "none", "why": "saturated: the gradient has full rank"},
    )  # fmt: skip
    with pytest.raises(AssertionError, match="did not run .not attacked: saturated"):
        assert_no_leakage(blank, max_rouge1=0.3)
    with pytest.raises(AssertionError, match="not attacked"):
        assert_leaks(blank, min_rouge1=0.0)
