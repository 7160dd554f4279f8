"""`gradaudit demo`: fine-tune the packaged MiniLM with the Trainer and `GradAuditCallback`.

Writes a small self-written customer-support data set (some messages carry planted canary
secrets), fine-tunes on CPU, audits a few sampled steps on an exact-leaking layer-0 module
and a deeper one, and prints each audit's scores with its canary exposure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from gradaudit.integrations.demo_data import CANARIES, MESSAGES


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register `gradaudit demo` (called through the `gradaudit.commands` entry point)."""
    parser = sub.add_parser("demo", help="fine-tune MiniLM with the auditor on; print leakage")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps (default 24)")
    parser.add_argument(
        "--modules", nargs="+", default=["value@0", "key@1"],
        help="module specs to audit, each on its own (default: value@0 key@1)",
    )  # fmt: skip
    parser.add_argument("--audits", type=int, default=8, help="audited steps (default 8)")
    parser.add_argument("--batch-size", type=int, default=1, help="training batch (default 1)")
    parser.add_argument(
        "--budget", type=float, default=0.5, help="attack budget (default 0.5, 1 = full)"
    )
    parser.add_argument(
        "--attack-timeout", type=float, default=120.0,
        help="seconds per attack before it is recorded as timed out (default 120)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("gradaudit-demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo)


def write_dataset(path: Path) -> Path:
    """The demo's messages as a TSV file (mode 0600: it holds the canaries)."""
    from gradaudit.io import atomic_write_text

    lines = ["text\tlabel"] + [f"{text}\t{label}" for text, label in MESSAGES]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def canary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per audit: the canary messages in its batch and the share of their secrets recovered."""
    from gradaudit.scoring.metrics import canary_exposure, words

    # References are the tokenizer's decoding ("hi," for "hi ,"): compare them word by word.
    secrets = {tuple(words(message)): secret for message, secret in CANARIES.items()}
    rows = []
    for audit in report["audits"]:
        exposures = []
        for s in audit.get("sentences") or []:
            reference = audit["references"][s["reference"]]
            secret = secrets.get(tuple(words(reference)))
            if secret is not None:
                rec = audit["reconstructions"][s["reconstruction"]]
                exposures.append(canary_exposure(secret, rec))
        rows.append({"audit": audit, "canaries": len(exposures),
                     "exposure": max(exposures) if exposures else None})  # fmt: skip
    return rows


def run_demo(args: argparse.Namespace) -> int:
    from gradaudit.integrations.trainer import GradAuditCallback  # the Trainer loads slowly

    from gradaudit import AuditConfig, load_model
    from gradaudit.experiments.data import load_examples
    from gradaudit.io import private_dir
    from gradaudit.report import read_report

    started = time.perf_counter()
    out = private_dir(args.out)
    data = load_examples(str(write_dataset(out / "support_messages.tsv")))
    model, tokenizer = load_model("minilm", seed=args.seed)
    every = max(1, args.steps // max(1, args.audits))
    config = AuditConfig(
        modules=args.modules,
        separate_modules=True,
        every_n_steps=every,
        first_step=max(1, every // 2),
        max_audits=args.audits,
        attack="auto",
        budget=args.budget,
        attack_timeout_s=args.attack_timeout,
        output_dir=str(out / "audit"),
        background=True,
        seed=args.seed,
    )
    trainer = _trainer(model, tokenizer, data, out, args)
    trainer.add_callback(GradAuditCallback(config, trainer=trainer))
    print(f"fine-tuning MiniLM for {args.steps} steps on {len(data)} support messages ...")
    trainer.train()
    _print_audits(read_report(config.output_dir))
    print(f"\nreport: {Path(config.output_dir).resolve() / 'report.html'}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def _trainer(model: Any, tokenizer: Any, data: Any, out: Path, args: argparse.Namespace) -> Any:
    """A plain `Trainer` (dropout on, gradient clipping at 1) over the demo's messages."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    encoded = tokenizer(data.texts, truncation=True)
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": label}
        for ids, mask, types, label in zip(
            encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"], data.labels
        )
    ]
    training = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=5e-5,
        max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )


def _print_audits(report: dict[str, Any]) -> None:
    """One line per audit: its scores and how much of a planted secret it recovered."""
    print(f"\n{'step':>5}  {'module':<44}{'gradient':<9}{'R1':>6}{'R2':>6}{'recall':>7}  canaries")
    for row in canary_rows(report):
        a = row["audit"]
        if a["error"]:
            print(f"{a['step']:>5}  {', '.join(a['modules']):<44}error: {a['error']}")
            continue
        exposure = "-" if row["exposure"] is None else f"{row['canaries']} in batch, "
        if row["exposure"] is not None:
            exposure += f"{100 * row['exposure']:.0f}% of a secret recovered"
        print(
            f"{a['step']:>5}  {', '.join(a['modules']):<44}{a['gradient']:<9}{a['rouge1']:>6.2f}"
            f"{a['rouge2']:>6.2f}{a['token_recall']:>7.2f}  {exposure}"
        )
