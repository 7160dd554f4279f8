"""Fine-tune the packaged MiniLM with Accelerate, auditing sampled steps.

    python examples/accelerate_loop.py --data /work/shared/data/sst2/dev.tsv
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --data ...  # DDP, gloo on CPU

Under DDP the audited gradient is the all-reduced one, so the report's batch is every
rank's micro-batches together; only the main process attacks and writes.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from gradaudit.integrations.accelerate import AccelerateAuditor
from torch.utils.data import DataLoader

from gradaudit import AuditConfig, load_model
from gradaudit.experiments.data import load_examples
from gradaudit.model.batch import make_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="TSV/CSV/JSONL file with sentences")
    parser.add_argument("--out", default="out/accelerate-loop", help="audit output directory")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--every", type=int, default=10, help="audit every N steps")
    parser.add_argument("--modules", nargs="+", default=["query@0"])
    parser.add_argument("--budget", type=float, default=0.05, help="attack budget (1 = paper)")
    args = parser.parse_args()

    # cpu=True on machines without CUDA, so torchrun's ranks form a gloo (MULTI_CPU) group.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), gradient_accumulation_steps=args.accumulation
    )
    base, tokenizer = load_model("minilm")
    base.train()
    examples = load_examples(args.data)
    n = args.steps * args.accumulation * args.batch_size * accelerator.num_processes
    pairs = list(zip(examples.texts[:n], examples.labels[:n]))
    loader = DataLoader(
        pairs,
        batch_size=args.batch_size,
        collate_fn=lambda rows: make_batch(base, tokenizer, *zip(*rows)),
    )
    optimizer = torch.optim.AdamW(base.parameters(), lr=2e-5)
    model, optimizer, loader = accelerator.prepare(base, optimizer, loader)
    config = AuditConfig(
        modules=args.modules, every_n_steps=args.every, budget=args.budget, output_dir=args.out
    )
    auditor = AccelerateAuditor(accelerator, model, optimizer, config, tokenizer=tokenizer)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            accelerator.print(f"step {auditor.step}: loss {loss.item():.3f}")
    accelerator.print("training done; waiting for the attacks")
    auditor.close()
    accelerator.print(f"report: {args.out}/report.md")


if __name__ == "__main__":  # required: the attack worker is spawned and re-imports this file
    main()
