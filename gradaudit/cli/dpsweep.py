"""`gradaudit dpsweep`: leakage of the DP-SGD released gradient against σ and ε."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm.auto import tqdm

from gradaudit.cli.common import (
    add_budget_argument,
    add_list_argument,
    add_model_argument,
    add_run_arguments,
)


def add_command(sub: argparse._SubParsersAction) -> None:
    dp = sub.add_parser(
        "dpsweep", help="leakage of the DP-SGD released gradient against σ and ε (+ utility)"
    )
    add_model_argument(dp, default="minilm")
    dp.add_argument("--data", required=True, help="TSV/CSV/JSONL path or glue/sst2, ...")
    dp.add_argument("--modules", nargs="+", required=True, help="module specs, e.g. query@0")
    add_list_argument(
        dp, "--sigmas", "noise multipliers σ", default=["0", "0.01", "0.1", "0.5", "1"]
    )
    dp.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C")
    dp.add_argument("--sample-rate", type=float, default=0.01, help="Poisson sampling rate q")
    dp.add_argument("--steps", type=int, default=1000, help="DP-SGD steps T behind ε")
    dp.add_argument("--delta", type=float, default=None, help="δ (default 1/N)")
    dp.add_argument(
        "--accountant", default="rdp", choices=["rdp", "prv"], help="Opacus accountant behind ε"
    )
    add_list_argument(dp, "--attacks", "attacks compared in one run", default=["auto", "gradmatch"])
    add_budget_argument(dp)
    dp.add_argument("--batch-size", type=int, default=1, help="sentences per attacked batch")
    dp.add_argument("--batches", type=int, default=2, help="attacked batches per σ")
    dp.add_argument(
        "--clip-scope",
        default="model",
        choices=["model", "modules"],
        help="clip each example over all trainable parameters (DP-SGD) or the modules only",
    )
    dp.add_argument("--utility", type=int, default=0, metavar="K", help="DP fine-tuning steps")
    dp.add_argument(
        "--utility-lr", type=float, default=5e-4, help="learning rate of the DP fine-tuning"
    )
    dp.add_argument("--eval-size", type=int, default=200, help="held-out examples for accuracy")
    add_run_arguments(dp)
    dp.add_argument(
        "--out", type=Path, default=Path("dpsweep-out"), help="folder for the sweep's outputs"
    )
    dp.add_argument("--redact", action="store_true", help="keep scores only, no text")
    dp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gradaudit.experiments.data import load_examples
    from gradaudit.experiments.dpsweep import (
        SweepSettings,
        parse_floats,
        render_table,
        run_dpsweep,
        write_dpsweep,
    )
    from gradaudit.model.loading import load_model

    settings = SweepSettings(
        modules=args.modules,
        sigmas=parse_floats(",".join(args.sigmas)),
        clip=args.clip,
        sample_rate=args.sample_rate,
        steps=args.steps,
        delta=args.delta,
        accountant=args.accountant,
        attacks=args.attacks,
        budgets=dict(args.attack_budget),
        batch_size=args.batch_size,
        batches=args.batches,
        clip_scope=args.clip_scope,
        utility_steps=args.utility,
        utility_lr=args.utility_lr,
        eval_size=args.eval_size,
        seed=args.seed,
    )
    settings.check()  # before loading anything
    model, tokenizer = load_model(args.model)
    progress = None if args.quiet else tqdm.write
    result = run_dpsweep(
        model, tokenizer, load_examples(args.data), settings, device=args.device, progress=progress
    )
    print(render_table(result))
    written = write_dpsweep(args.out, result, redact=args.redact)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
