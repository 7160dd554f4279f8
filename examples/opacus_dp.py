"""Audit what DP-SGD really releases: MiniLM fine-tuned on SST-2 with Opacus.

The released gradient of a step (per-example clipped, summed, noised, averaged) is captured
through a step pre-hook of the DPOptimizer's wrapped optimizer, together with the raw batch
gradient an attack on `.grad` right after `backward()` would see, and both are attacked.

    HF_HUB_OFFLINE=1 python examples/opacus_dp.py ../shared/data/sst2/dev.tsv \
        --sigma 1.0 --steps 5 --attack gradmatch --budget 0.1
"""

from __future__ import annotations

import argparse

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from gradaudit import audit_snapshot, load_model, select_modules
from gradaudit.experiments.data import load_examples
from gradaudit.experiments.dpsweep import frozen_embeddings_copy
from gradaudit.privacy import (
    check_dp_parameters,
    default_delta,
    dp_snapshot,
    dp_step,
    engine_statement,
    watch_released_gradients,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="SST-2 dev.tsv (sentence<TAB>label)")
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=2, help="expected Poisson batch size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modules", default="query@0")
    parser.add_argument("--attack", default="gradmatch")
    parser.add_argument("--budget", type=float, default=0.1)
    args = parser.parse_args()
    check_dp_parameters(noise_multiplier=args.sigma, clip=args.clip)

    model, tokenizer = load_model("minilm")
    # Opacus cannot give BERT's position embeddings per-example gradients: freeze them
    # (and the other embedding tables, whose per-example gradients are large).
    model = frozen_embeddings_copy(model).train()
    modules = select_modules(model, args.modules)
    examples = load_examples(args.data)
    enc = tokenizer(
        examples.texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    data = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(examples.labels))
    loader = DataLoader(data, batch_size=args.batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    engine = PrivacyEngine(accountant="rdp")
    torch.manual_seed(0)
    private, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=args.sigma,
        max_grad_norm=args.clip,
    )
    delta = default_delta(len(data))

    captured = []
    current: dict[str, torch.Tensor] = {}
    step = 0

    def on_step() -> None:  # p.grad now holds exactly what this step releases
        noised = dp_snapshot(private, optimizer, current, modules, step=step)
        if noised is None:  # an empty Poisson batch: pure noise, nothing to reconstruct
            print(f"step {step}: empty Poisson batch, skipped")
            return
        raw = dp_snapshot(private, optimizer, current, modules, kind="raw", step=step)
        captured.append((raw, noised, engine_statement(engine, delta, clip=args.clip)))

    handle = watch_released_gradients(optimizer, on_step)
    for ids, mask, labels in loader:
        current = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        dp_step(private, optimizer, current)
        step += 1
        if len(captured) == args.steps:
            break
    handle.remove()
    private.remove_hooks()  # attacks copy the model: without Opacus's hooks

    model.eval()
    raw, noised, privacy = captured[-1]
    print(privacy["statement"])
    for snapshot in (raw, noised):
        result = audit_snapshot(model, tokenizer, snapshot, args.attack, budget=args.budget)
        print(f"{snapshot.kind:>6} gradient of step {snapshot.step} (B={snapshot.batch_size}): ")
        print(f"  ROUGE-1 {result.rouge1:.3f}  ROUGE-2 {result.rouge2:.3f}")
        for ref, rec in zip(result.references, result.reconstructions):
            print(f"  {ref!r}\n    -> {rec!r}")


if __name__ == "__main__":
    main()
