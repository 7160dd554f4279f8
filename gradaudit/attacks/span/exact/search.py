"""Exact mode's search: which of each slot's screened tokens each sentence holds.

Screening leaves a few tokens per slot; a hypothesis picks one per (sentence, slot). For query
and key modules the membership annealing (`assign`) proposes hypotheses first; otherwise, or
when that leaves the batch unsolved, a coordinate search scores each move by the full gradient
match: the labels are known, so a sentence's own forward/backward pass gives its exact share
`G_b` of the gradient.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from gradaudit.attacks.span.exact.cohesion import cohesion_order
from gradaudit.attacks.span.exact.membership import MEMBERSHIP_EXACT, Membership, assign
from gradaudit.attacks.span.exact.screening import Slot
from gradaudit.model.families import layout

EXACT_RESIDUAL = 1e-4  # relative gradient residual of a solved batch (~1e-6 when exact)
RESTARTS = 4  # annealing runs from shuffled starts, while none is exact
MAX_ORDERS = 24  # orders of equal-length sentences tried against the labels


def sentence_gradients(
    model: nn.Module, module: nn.Module, batch: dict[str, torch.Tensor], scale: float
) -> torch.Tensor:
    """Weight gradient of `module` per sentence (n x out x in) for `scale` x the batch loss."""
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        captured.extend((inputs[0], out))

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            loss = model(**batch).loss * scale
            (signal,) = torch.autograd.grad(loss, captured[1])
    finally:
        handle.remove()
    return torch.einsum("bto,bti->boi", signal, captured[0].detach())


def _hypothesis_batch(
    batch: dict[str, torch.Tensor], rows: list[int], ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    out = {k: v[rows] for k, v in batch.items() if k != "input_ids"}
    out["input_ids"] = ids
    return out


@dataclass
class Search:
    """Coordinate search over per-slot token choices, scored by the full gradient match."""

    model: nn.Module
    module: nn.Module
    batch: dict[str, torch.Tensor]
    target: torch.Tensor
    forward_batch: int

    def gradients(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        """Per-sentence gradients of hypothesis sentences (`rows` give their structure)."""
        size = self.batch["input_ids"].shape[0]
        parts = []
        for start in range(0, len(rows), self.forward_batch):
            part = rows[start : start + self.forward_batch]
            hyp = _hypothesis_batch(self.batch, part, ids[start : start + self.forward_batch])
            parts.append(sentence_gradients(self.model, self.module, hyp, len(part) / size))
        return torch.cat(parts)

    def run(
        self,
        ids: torch.Tensor,
        slots: list[Slot],
        pools: list[torch.Tensor],
        sweeps: int,
        kept: list[int],
    ) -> tuple[torch.Tensor, float]:
        """Improve `ids` (batch x length) slot by slot; returns them and the relative residual.

        `kept[j]`: how many of `pools[j]`'s first words are known to sit at slot j."""
        membership = Membership.build(self.model, self.module, self.batch, self.target)
        if membership is not None:
            generator = torch.Generator().manual_seed(0)
            best, best_ids = math.inf, ids
            for _ in range(RESTARTS):
                assigned, score = assign(membership, ids, slots, pools, generator)
                if score < best:
                    best, best_ids = score, assigned
                if score < MEMBERSHIP_EXACT:
                    break
            ids, residual = self.order_by_label(best_ids)
            if residual < EXACT_RESIDUAL:
                return ids, residual
        else:  # value modules and LoRA parts: from the signals' cohesion, then the pools' order
            sorted_ids = cohesion_order(layout(self.model), self.batch, self.target, ids, slots)
            best, best_ids = math.inf, ids
            for start in (sorted_ids, ids):  # neither start's search wins on every batch
                found, residual = self.order_by_label(start)
                if residual >= EXACT_RESIDUAL:
                    found, residual = self.descend(found, slots, pools, sweeps, kept)
                if residual < best:
                    best, best_ids = residual, found
                if best < EXACT_RESIDUAL:
                    break
            return best_ids, best
        return self.descend(ids, slots, pools, sweeps, kept)

    def descend(
        self,
        ids: torch.Tensor,
        slots: list[Slot],
        pools: list[torch.Tensor],
        sweeps: int,
        kept: list[int],
    ) -> tuple[torch.Tensor, float]:
        """The coordinate search alone, from `ids`; returns them and the relative residual."""
        grads = self.gradients(list(range(ids.shape[0])), ids)
        residual = self.target - grads.sum(0)
        for _ in range(sweeps):
            changed = False
            for slot, pool, sure in zip(slots, pools, kept):
                if len(pool) == 1:
                    continue
                while self._improve(ids, grads, residual, slot, pool, sure):
                    changed = True
            if not changed:
                break
        return ids, float(residual.norm() / self.target.norm())

    def order_by_label(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Best order of `ids`' rows among sentences of equal length (membership is label-blind).

        Returns the ids and their relative gradient residual; orders tried in one batch.
        """
        size = ids.shape[0]
        lengths = self.batch["attention_mask"].sum(1).tolist()
        groups: dict[int, list[int]] = {}
        for b, n in enumerate(lengths):
            groups.setdefault(n, []).append(b)
        orders = [list(range(size))]
        for group in groups.values():
            if len(group) > 1 and math.factorial(len(group)) <= MAX_ORDERS:
                extended = []
                for order in orders:
                    for perm in itertools.permutations(group):
                        new = list(order)
                        for b, p in zip(group, perm):
                            new[b] = order[p]
                        extended.append(new)
                orders = extended[:MAX_ORDERS]
        grads = self.gradients(list(range(size)) * len(orders), ids[sum(orders, [])])
        fits = grads.reshape(len(orders), size, *grads.shape[1:]).sum(1)
        norms = (self.target - fits).flatten(1).norm(dim=1) / self.target.norm()
        best = int(norms.argmin())
        return ids[orders[best]], float(norms[best])

    def _improve(
        self,
        ids: torch.Tensor,
        grads: torch.Tensor,
        residual: torch.Tensor,
        slot: Slot,
        pool: torch.Tensor,
        kept: int,
    ) -> bool:
        """Apply the best single or swap move at `slot`; False when none lowers the residual.

        The pool's first `kept` words are known to sit at this slot: they move between its
        sentences by swaps, but are never replaced.
        """
        col = slot.column
        members = slot.sentences
        current = {b: int(ids[b, col]) for b in members}
        sure = set(pool[:kept].tolist())
        singles = [
            (b, int(v))
            for b in members
            if current[b] not in sure
            for v in pool[kept:]
            if int(v) != current[b]
        ]
        halves = [(b, current[c]) for b in members for c in members if current[c] != current[b]]
        moves = list(dict.fromkeys(singles + halves))
        if not moves:
            return False
        hyp_ids = torch.stack([ids[b] for b, _ in moves])
        hyp_ids[:, col] = torch.tensor([v for _, v in moves], device=ids.device)
        hyp = self.gradients([b for b, _ in moves], hyp_ids)
        index = {m: i for i, m in enumerate(moves)}
        change = hyp - grads[[b for b, _ in moves]]  # moves x out x in
        candidates = [((index[m],), change[index[m]]) for m in singles]
        for x, b in enumerate(members):
            for c in members[x + 1 :]:
                if current[b] != current[c]:
                    i, j = index[(b, current[c])], index[(c, current[b])]
                    candidates.append(((i, j), change[i] + change[j]))
        stack = torch.stack([d for _, d in candidates])
        norms = (residual - stack).flatten(1).norm(dim=1)
        best = int(norms.argmin())
        if not norms[best] < residual.norm() * (1 - 1e-6):
            return False
        for i in candidates[best][0]:
            b, v = moves[i]
            ids[b, col] = v
            grads[b] = hyp[i]
        residual.sub_(candidates[best][1])
        return True
