"""Audit a transformers.Trainer run made private with Opacus (the dp-transformers wiring).

`DPTrainer` makes the model, optimizer and data private with one `PrivacyEngine`: the model
becomes a GradSampleModule, the optimizer a DPOptimizer, the data Poisson-sampled batches.
`GradAuditCallback(..., privacy_engine=engine)` then audits the gradient DP-SGD releases
("noised") and reports ε next to each audit.

    HF_HUB_OFFLINE=1 python examples/trainer_dp.py ../shared/data/sst2/dev.tsv \
        --sigma 1.0 --steps 10 --every 5 --budget 0.05
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from gradaudit.integrations.trainer import GradAuditCallback
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from gradaudit import AuditConfig, load_model
from gradaudit.experiments.data import load_examples
from gradaudit.experiments.dpsweep import frozen_embeddings_copy
from gradaudit.privacy import check_dp_parameters, is_empty_batch, prepare_empty_step


class DPTrainer(Trainer):
    """A Trainer taking DP-SGD steps: per-example clipping to `max_grad_norm`, noise σ·C.

    The expected batch size is `per_device_train_batch_size`; one process, no gradient
    accumulation (split large batches with Opacus's BatchMemoryManager instead).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        args: TrainingArguments,
        train_dataset: Dataset,
        data_collator: Any,
        privacy_engine: PrivacyEngine,
        noise_multiplier: float,
        max_grad_norm: float,
        **kwargs: Any,
    ) -> None:
        check_dp_parameters(noise_multiplier=noise_multiplier, clip=max_grad_norm)
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                "DPTrainer takes one Poisson batch per step: set gradient_accumulation_steps=1 "
                "and raise per_device_train_batch_size (the expected batch size) instead"
            )
        loader = DataLoader(
            train_dataset, batch_size=args.per_device_train_batch_size, collate_fn=data_collator
        )
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate
        )
        private, optimizer, self.dp_loader = privacy_engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(
            model=private,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            optimizers=(optimizer, None),
            **kwargs,
        )

    def get_train_dataloader(self) -> DataLoader:
        # Poisson batches must reach the model as sampled: not re-batched by accelerate.
        return self.dp_loader

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        # Opacus keeps summed per-example gradients until its own zero_grad; the Trainer only
        # zeroes the model's, so the second step would fail without this.
        self.optimizer.zero_grad()
        if is_empty_batch(inputs):  # the step must still release noise and be counted
            prepare_empty_step(self.optimizer)
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="TSV/CSV/JSONL file with sentences and labels")
    parser.add_argument("--out", default="out/trainer-dp", help="Trainer and audit directory")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier σ")
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C")
    parser.add_argument("--batch-size", type=int, default=8, help="expected Poisson batch size")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=5, help="audit every N steps")
    parser.add_argument("--modules", nargs="+", default=["query@0"])
    parser.add_argument("--budget", type=float, default=0.05, help="attack budget (1 = paper)")
    args = parser.parse_args()

    model, tokenizer = load_model("minilm")
    # Opacus cannot give BERT's position embeddings per-example gradients: freeze them
    # (and the other embedding tables, whose per-example gradients are large).
    model = frozen_embeddings_copy(model).train()
    examples = load_examples(args.data)
    dataset = [
        {**tokenizer(text, truncation=True, max_length=64), "labels": label}
        for text, label in zip(examples.texts, examples.labels)
    ]
    engine = PrivacyEngine(accountant="rdp")
    trainer = DPTrainer(
        model=model,
        args=TrainingArguments(
            f"{args.out}/trainer",
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=5e-4,
            max_grad_norm=0.0,  # DP-SGD clips each example; the Trainer's batch clip is moot
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        privacy_engine=engine,
        noise_multiplier=args.sigma,
        max_grad_norm=args.clip,
    )
    config = AuditConfig(
        modules=args.modules,
        every_n_steps=args.every,
        budget=args.budget,
        output_dir=f"{args.out}/audit",
    )
    trainer.add_callback(GradAuditCallback(config, trainer=trainer, privacy_engine=engine))
    trainer.train()
    print(f"report: {args.out}/audit/report.md")


if __name__ == "__main__":  # required: the attack worker is spawned and re-imports this file
    main()
