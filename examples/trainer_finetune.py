"""Fine-tune the packaged MiniLM with transformers.Trainer, auditing sampled steps.

    python examples/trainer_finetune.py --data /work/shared/data/sst2/dev.tsv

Audit scores are logged as gradaudit/rouge1 etc. through the Trainer, so every report_to
integration receives them; the full report lands in --out.
"""

from __future__ import annotations

import argparse

from gradaudit.integrations.trainer import GradAuditCallback
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from gradaudit import AuditConfig, load_model
from gradaudit.experiments.data import load_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="TSV/CSV/JSONL file with sentences")
    parser.add_argument("--out", default="out/trainer", help="Trainer and audit output directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--every", type=int, default=10, help="audit every N steps")
    parser.add_argument("--modules", nargs="+", default=["query@0"])
    parser.add_argument("--budget", type=float, default=0.05, help="attack budget (1 = paper)")
    args = parser.parse_args()

    model, tokenizer = load_model("minilm")
    examples = load_examples(args.data)
    n = args.steps * args.batch_size
    dataset = [
        {**tokenizer(text), "labels": label}
        for text, label in zip(examples.texts[:n], examples.labels[:n])
    ]
    training = TrainingArguments(
        f"{args.out}/trainer",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-5,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    config = AuditConfig(
        modules=args.modules,
        every_n_steps=args.every,
        budget=args.budget,
        output_dir=f"{args.out}/audit",
    )
    trainer.add_callback(GradAuditCallback(config, trainer=trainer))
    trainer.train()
    print(f"report: {args.out}/audit/report.md")


if __name__ == "__main__":  # required: the attack worker is spawned and re-imports this file
    main()
