"""Fine-tune the packaged MiniLM on SST-2 sentences in a plain torch loop, auditing as it trains.

    python examples/plain_torch_loop.py --data /work/shared/data/sst2/dev.tsv

The Auditor takes the gradient in the optimizer's step pre-hook (after clipping here), saves
sampled steps and attacks them in a worker process while training goes on.
"""

from __future__ import annotations

import argparse

import torch

from gradaudit import AuditConfig, Auditor, load_model
from gradaudit.experiments.data import load_examples
from gradaudit.model.batch import make_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="TSV/CSV/JSONL file with sentences")
    parser.add_argument("--out", default="out/plain-loop", help="audit output directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--every", type=int, default=10, help="audit every N steps")
    parser.add_argument("--modules", nargs="+", default=["query@0"])
    parser.add_argument("--budget", type=float, default=0.05, help="attack budget (1 = paper)")
    args = parser.parse_args()

    model, tokenizer = load_model("minilm")
    model.train()
    batches = load_examples(args.data).batches(args.batch_size, args.steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    config = AuditConfig(
        modules=args.modules, every_n_steps=args.every, budget=args.budget, output_dir=args.out
    )
    with Auditor(model, config, tokenizer=tokenizer, optimizer=optimizer, max_grad_norm=1.0):
        for step, (texts, labels) in enumerate(batches, 1):
            loss = model(**make_batch(model, tokenizer, texts, labels)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            print(f"step {step}: loss {loss.item():.3f}")
        print("training done; waiting for the attacks")
    print(f"report: {args.out}/report.md")


if __name__ == "__main__":  # required: the attack worker is spawned and re-imports this file
    main()
