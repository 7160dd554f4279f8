"""Fine-tune the packaged MiniLM with LoRA (PEFT) and transformers.Trainer, auditing the adapters.

    HF_HUB_OFFLINE=1 python examples/trainer_lora.py --data ../shared/data/sst2/dev.tsv

Only the adapters train (r = 8 on query and value; the base weights are frozen), so the
gradient a partial-gradient attacker sees is the adapters': the audit attacks the layer-0
`lora_A` parts (`query@0:lora_A`, `value@0:lora_A`), whose inputs are the layer's own. PEFT
starts every lora_B at zero, so no gradient reaches lora_A at step 1: that audit is reported
not attacked, with the reason. With r below the batch's tokens, lora_A's row space is an
r-dimensional slice of the inputs' span ("span partial" in each audit's info.regime). Audit
scores are logged as gradaudit/rouge1 etc. through the Trainer; the full report lands in --out.
"""

from __future__ import annotations

import argparse

from gradaudit.integrations.trainer import GradAuditCallback
from peft import LoraConfig, TaskType, get_peft_model
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from gradaudit import AuditConfig, load_model
from gradaudit.experiments.data import load_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="TSV/CSV/JSONL file with sentences")
    parser.add_argument("--out", default="out/trainer_lora", help="Trainer and audit output")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--every", type=int, default=10, help="audit every N steps")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument(
        "--modules", nargs="+", default=["query@0:lora_A", "value@0:lora_A"], help="adapter parts"
    )
    parser.add_argument("--budget", type=float, default=0.05, help="attack budget (1 = paper)")
    args = parser.parse_args()

    model, tokenizer = load_model("minilm")
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"],
        task_type=TaskType.SEQ_CLS,
    )  # fmt: skip
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
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
        learning_rate=5e-4,  # adapters take a larger rate than full fine-tuning
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
        attack="auto",
        budget=args.budget,
        output_dir=f"{args.out}/audit",
    )
    trainer.add_callback(GradAuditCallback(config))
    trainer.train()
    print(f"report: {args.out}/audit/report.md (and report.json: each audit's info.regime)")


if __name__ == "__main__":  # required: the attack worker is spawned and re-imports this file
    main()
