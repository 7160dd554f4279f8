"""Helpers for the training-loop tests: a tiny labelled text set and a plain training loop."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gradaudit import AuditConfig

SENTENCES = [
    ("the movie was very good", 1),
    ("a boring film with a bad plot", 0),
    ("the actress was charming and funny", 1),
    ("this story is too long and slow", 0),
    ("i love the music in this film", 1),
    ("the ending was awful", 0),
    ("a great cast and a bright script", 1),
    ("never watch this dark sad movie", 0),
]


class TinyTexts(Dataset):
    """`n` tokenized sentences (unpadded; the collator pads), cycling through SENTENCES."""

    def __init__(self, tokenizer, n: int = 32) -> None:
        self.items = []
        for i in range(n):
            text, label = SENTENCES[i % len(SENTENCES)]
            encoded = tokenizer(text)
            self.items.append({**encoded, "labels": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def tiny_config(out: Path, **overrides) -> AuditConfig:
    """An inline, fast gradmatch config writing to `out` (every 5 steps unless `steps`)."""
    settings = {
        "modules": ["query@0"],
        "every_n_steps": None if "steps" in overrides else 5,
        "attack": "gradmatch",
        "budget": 0.01,
        "output_dir": str(out),
        "background": False,
    }
    return AuditConfig(**{**settings, **overrides})


def read_audits(out: Path) -> list[dict]:
    return json.loads((Path(out) / "report.json").read_text())["audits"]


def final_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_trainer(tokenizer, out, config=None, *, max_steps, model=None, **args):
    """A CPU Trainer over `model` (a new tiny BERT by default) on TinyTexts; with `config`,
    GradAuditCallback audits it and logs through the trainer."""
    from conftest import make_tiny_model
    from gradaudit.integrations.trainer import GradAuditCallback
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    settings = {
        "per_device_train_batch_size": 4,
        "max_steps": max_steps,
        "learning_rate": 1e-3,
        "logging_steps": 100,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **args,
    }
    trainer = Trainer(
        model=model if model is not None else make_tiny_model(tokenizer.vocab_size),
        args=TrainingArguments(str(out / "trainer"), **settings),
        train_dataset=TinyTexts(tokenizer, 64),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    if config is not None:
        trainer.add_callback(GradAuditCallback(config, trainer=trainer))
    return trainer
