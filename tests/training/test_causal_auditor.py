"""The Auditor on a causal LM trained by a plain loop that computes its loss itself."""

from __future__ import annotations

import json

import torch
from _decoders import decoder_tokenizer, tiny_llama

from gradaudit import AuditConfig, Auditor, GradientSnapshot
from gradaudit.model.batch import causal_labels


def test_a_causal_lm_called_without_labels_is_audited_with_its_ids_as_labels(tmp_path):
    model, tokenizer = tiny_llama(), decoder_tokenizer()
    config = AuditConfig(
        modules=["query@1"], steps=[1], attack=None, background=False, output_dir=str(tmp_path)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = tokenizer(["the movie was good", "a boring plot"], padding=True, return_tensors="pt")
    with Auditor(model, config, tokenizer=tokenizer, optimizer=optimizer):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = causal_labels(batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()
        optimizer.step()
    (audit,) = json.loads((tmp_path / "report.json").read_text())["audits"]
    assert audit["step"] == 1 and audit["error"].startswith("not attacked (capture only")
    snapshot = GradientSnapshot.load(tmp_path / "snapshots" / "step-00000001")
    assert torch.equal(snapshot.batch["labels"], labels)
