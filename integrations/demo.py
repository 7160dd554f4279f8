"""`gradaudit demo`: fine-tune the packaged MiniLM with the Trainer and `GradAuditCallback`.

Writes a small self-written customer-support data set (some messages carry planted canary
secrets), fine-tunes on CPU as people do (batch 8, dropout on, the Trainer's defaults
otherwise), audits sampled steps at a layer-0 module and a deeper one in the background,
and prints the verdict per module, each audit's scores with its canary exposure, and which
attacks did not finish within the demo's time limit, and why.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from gradaudit.integrations.demo_data import CANARIES, MESSAGES

# Seconds the demo keeps before its first attack can start (loading MiniLM, training's
# first step, starting the worker) and after its last (the report). The attacks run one
# after another in the time between: each may take all that is left; at the limit, the one
# still running is stopped and recorded as not finished.
SETUP_S = 45.0
REPORT_S = 10.0


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register `gradaudit demo` (called through the `gradaudit.commands` entry point)."""
    from gradaudit.cli.common import add_list_argument

    parser = sub.add_parser(
        "demo",
        help="fine-tune MiniLM with the auditor on; print the verdict",
        description="Fine-tune the packaged MiniLM on 32 support messages (8 hold planted "
        "secrets) with the Trainer at batch 8, dropout on, auditing in the background; print "
        "the verdict per module and how much of each secret the attacks recovered.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    add_list_argument(
        parser, "--modules", default=["query@0", "query@1"],
        help="module specs to audit, each on its own: a layer-0 one and a deeper one",
    )  # fmt: skip
    parser.add_argument("--audits", type=int, default=1, help="audited steps")
    parser.add_argument(
        "--budget", type=float, default=0.5, help="attack budget (1 = the full search)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=170.0,
        help="seconds the whole demo may take: each attack gets an equal share of what "
        "loading and training leave, and one that needs more is reported as timed out",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("gradaudit-demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="training and attack seed")
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


def demo_config(args: argparse.Namespace, out: Path) -> Any:
    """The audit settings: `--audits` steps spread over the run, each module on its own,
    attacked in the background, on one thread, with what the time limit leaves after setup
    and the report."""
    from gradaudit import AuditConfig

    every = max(1, args.steps // max(1, args.audits))
    attack_time = max(10.0, args.time_limit - SETUP_S - REPORT_S)
    return AuditConfig(
        modules=args.modules,
        steps=[1 + k * every for k in range(args.audits)],
        attack="auto",
        budget=args.budget,
        attack_timeout_s=attack_time,
        close_timeout_s=attack_time,  # set again at train end, to what is left by then
        start_timeout_s=SETUP_S,
        output_dir=str(out / "audit"),
        seed=args.seed,
    )


def deadline_callback(config: Any, deadline: float) -> Any:
    """A GradAuditCallback whose close at train end waits for the attacks only until
    `deadline` (a `time.perf_counter()` value)."""
    from gradaudit.integrations.trainer import GradAuditCallback  # the Trainer loads slowly

    class DeadlineCallback(GradAuditCallback):
        def on_train_end(self, args, state, control, **kwargs) -> None:
            if self.auditor is not None:  # close_timeout_s is read when close() starts
                self.auditor.config.close_timeout_s = max(1.0, deadline - time.perf_counter())
            super().on_train_end(args, state, control, **kwargs)

    return DeadlineCallback(config)


def run_demo(args: argparse.Namespace) -> int:
    from gradaudit import load_model
    from gradaudit.experiments.data import load_examples
    from gradaudit.io import private_dir
    from gradaudit.report import read_report

    started = time.perf_counter()
    out = private_dir(args.out)
    data = load_examples(str(write_dataset(out / "support_messages.tsv")))
    model, tokenizer = load_model("minilm", seed=args.seed)
    config = demo_config(args, out)
    deadline = started + args.time_limit - REPORT_S
    trainer = _trainer(model, tokenizer, data, out, args, [deadline_callback(config, deadline)])
    print(
        f"fine-tuning MiniLM for {args.steps} steps (batch {args.batch_size}, dropout on) on "
        f"{len(data)} support messages; auditing step(s) {', '.join(map(str, config.steps))} "
        f"at {' and '.join(config.modules)} in the background (attacks stop at the "
        f"{args.time_limit:g} s limit) ..."
    )
    trainer.train()
    report = read_report(config.output_dir)
    _print_verdict(report)
    _print_audits(report)
    print_unfinished(report, config, args)
    print(f"\nreport: {Path(config.output_dir).resolve() / 'report.html'}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def _trainer(
    model: Any, tokenizer: Any, data: Any, out: Path, args: argparse.Namespace, callbacks: list
) -> Any:
    """A `Trainer` over the demo's messages as people fine-tune: the batch size and step
    count given, dropout on, everything else the Trainer's defaults (learning rate 5e-5,
    gradient clipping at 1, AdamW, linear schedule)."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

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
        save_strategy="no",  # (no 90 MB checkpoint for a demo)
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the demo prints its own summary
    return trainer


def _print_verdict(report: dict[str, Any]) -> None:
    from gradaudit.report.verdict import levels_line, verdicts

    print("\nverdict:")
    for verdict in verdicts(report):
        print(f"  {verdict}")
    print(f"  ({levels_line()})")


def _label(audit: dict[str, Any]) -> str:
    from gradaudit.model.families import modules_label

    return modules_label(audit["modules"])


def _print_audits(report: dict[str, Any]) -> None:
    """One line per audit: its scores and how much of a planted secret it recovered."""
    print(f"\n{'step':>5}  {'module':<10}{'gradient':<9}{'R1':>6}{'R2':>6}{'recall':>7}  canaries")
    for row in canary_rows(report):
        a = row["audit"]
        if a["error"]:
            print(f"{a['step']:>5}  {_label(a):<10}{a['gradient']:<9}  not measured (below)")
            continue
        exposure = "-" if row["exposure"] is None else f"{row['canaries']} in batch, "
        if row["exposure"] is not None:
            exposure += f"{100 * row['exposure']:.0f}% of a secret recovered"
        print(
            f"{a['step']:>5}  {_label(a):<10}{a['gradient']:<9}{a['rouge1']:>6.2f}"
            f"{a['rouge2']:>6.2f}{a['token_recall']:>7.2f}  {exposure}"
        )


def unfinished(audit: dict[str, Any]) -> bool:
    """Whether an audit has no scores because the demo's time ran out for it."""
    error = audit["error"] or ""
    return "timed out" in error or "close timeout" in error


def print_unfinished(report: dict[str, Any], config: Any, args: argparse.Namespace) -> None:
    """Each audit without scores, and why: for lack of time, with how to give it more."""
    failed = [a for a in report["audits"] if a["error"]]
    if not failed:
        return
    print("\nnot measured:")
    for audit in failed:
        where = f"step {audit['step']} {_label(audit)}"
        if not unfinished(audit):
            print(f"  {where}: {audit['error']}")
            continue
        when = (
            f"within attack_timeout_s={config.attack_timeout_s:.0f} s"
            if "timed out" in audit["error"]
            else "before the demo's time limit"
        )
        print(
            f"  {where}: its attack did not finish {when} (--time-limit {args.time_limit:g} s); "
            "a timeout, not a low score: the verdict counts it as not measured. "
            "Give it time with --time-limit 1200"
        )
