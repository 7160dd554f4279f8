"""Gradient matching: optimise continuous input embeddings until their gradients match.

The published baseline (LAMP's cosine configuration, as used by the partial-gradient paper):
Adam on the word embeddings of the content positions, loss = mean over observed tensors of
(1 - cos) plus a penalty pulling the mean embedding norm to a target, a Gaussian-then-
permutation initialisation, and discrete reordering moves during optimisation. The language
model prior of LAMP is not part of this attack.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import (
    GRADIENT_MATCHING,
    Attack,
    Reconstruction,
    candidate_token_ids,
    content_mask,
    from_ids,
)
from gradaudit.errors import GradAuditError
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.families import layout

MOVE_KINDS = ("swap", "move_token", "move_span", "prefix_to_end")


@dataclass
class GradMatchOptions:
    """Every number of the attack; defaults are the published settings (LAMP, cosine)."""

    steps: int = 2000  # Adam steps at budget 1
    lr: float = 0.01
    lr_decay: float = 0.89  # the learning rate is multiplied by this ...
    lr_decay_every: int = 50  # ... every this many steps
    init_candidates: int = 500  # Gaussian starting points scored, at budget 1
    init_permutations: int = 500  # content permutations of the best one scored, at budget 1
    embedding_norm: float = 1.4  # target L2 norm of a token embedding (BERT-base's mean)
    reg_weight: float = 1.0  # weight of (mean content norm - embedding_norm)^2
    moves_start: float = 0.1  # share of the steps before discrete moves begin
    moves_every: int = 75  # steps between two rounds of moves
    moves: int = 200  # random reorderings tried per sentence and round
    candidates_per_pass: int = 50  # candidates scored in one batched pass (speed and memory only)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("reg_weight", "moves_start", "moves"):
                if value < 0:
                    raise GradAuditError(f"gradmatch option {f.name} must be >= 0, got {value}")
            elif value <= 0:
                raise GradAuditError(f"gradmatch option {f.name} must be > 0, got {value}")


class GradientMatcher:
    """The gradient-matching loss for one snapshot, with the known parts of the batch fixed."""

    def __init__(
        self,
        model: nn.Module,
        snapshot: GradientSnapshot,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        options: GradMatchOptions,
    ) -> None:
        self.model = model
        self.options = options
        self.modules: dict[str, nn.Linear] = {}
        self.targets: list[tuple[str, str, torch.Tensor]] = []
        for name, grad in snapshot.gradients.items():
            module_name, _, kind = name.rpartition(".")
            module = model.get_submodule(module_name)
            if not isinstance(module, nn.Linear) or kind not in ("weight", "bias"):
                raise GradAuditError(
                    f"gradmatch matches gradients of linear layers only, and {name!r} is not "
                    "one: capture linear modules (see gradaudit.select_modules)"
                )
            self.modules[module_name] = module
            self.targets.append((module_name, kind, grad.to(device).flatten()))
        batch = {k: v.to(device) for k, v in snapshot.batch.items()}
        mask = content_mask(snapshot, tokenizer)
        self.mask = mask.to(device)
        self.positions = [torch.nonzero(row).flatten().tolist() for row in mask]
        self._identity = torch.arange(mask.shape[1]).expand_as(mask)
        lay = layout(model)
        self.embeddings = lay.word_embeddings.weight.detach()
        # Special and padding positions keep their true embeddings; content ids are never read.
        self.known_ids = batch["input_ids"].masked_fill(self.mask, 0)
        self.fixed = self.embeddings[self.known_ids]
        self.inputs = {
            "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"],
            "position_ids": lay.position_ids(batch["attention_mask"]),
            "labels": batch["labels"],
        }

    def losses(self, xs: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """Loss of each of K candidate batches `xs` (K, B, L, H), from one forward pass.

        Loss = mean over observed tensors of (1 - cos) + reg_weight (mean content norm -
        target)^2. Each candidate's weight gradient is the sum over its own rows of
        output-gradient x input, so K candidates cost one batched pass; cosine ignores the
        1/K the batched mean loss puts on every gradient.
        """
        k = xs.shape[0]
        embeds = torch.where(self.mask.unsqueeze(-1), xs, self.fixed).flatten(0, 1)
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                seen[name] = (args[0], out)

            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in self.modules.items()]
        try:
            inputs = {n: v.repeat(k, *[1] * (v.dim() - 1)) for n, v in self.inputs.items()}
            loss = self.model(inputs_embeds=embeds, **inputs).loss
        finally:
            for handle in handles:
                handle.remove()
        names = list(self.modules)
        outs = torch.autograd.grad(loss, [seen[n][1] for n in names], create_graph=create_graph)
        grad_out = {n: g.reshape(k, -1, g.shape[-1]) for n, g in zip(names, outs)}
        dists = []
        for name, kind, target in self.targets:
            g = grad_out[name]
            if kind == "weight":
                a = seen[name][0].reshape(k, -1, seen[name][0].shape[-1])
                grad = torch.einsum("kno,kni->koi", g, a).flatten(1)
            else:
                grad = g.sum(1)
            dists.append(1 - F.cosine_similarity(grad, target.unsqueeze(0), dim=1))
        norm = xs[:, self.mask].norm(dim=-1).mean(-1)
        reg = (norm - self.options.embedding_norm).square()
        return torch.stack(dists).mean(0) + self.options.reg_weight * reg

    def reindex(self, orders: list[list[list[int]]]) -> torch.Tensor:
        """Position indices (N, B, L): in candidate n, sentence b's k-th content slot gets its
        content token `orders[n][b][k]`; special and padding positions stay."""
        index = self._identity.repeat(len(orders), 1, 1)
        for n, candidate in enumerate(orders):
            for b, (pos, order) in enumerate(zip(self.positions, candidate)):
                index[n, b, pos] = torch.tensor([pos[k] for k in order], dtype=torch.long)
        return index.to(self.mask.device)

    def best_of(
        self,
        count: int,
        make: Callable[[int], torch.Tensor],
        x: torch.Tensor,
        loss: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` or the best of `count` candidates from `make(n)`, if lower; scored in passes."""
        per_pass = self.options.candidates_per_pass
        for start in range(0, count, per_pass):
            xs = make(min(per_pass, count - start))
            losses = self.losses(xs).detach()
            i = losses.argmin()
            x = torch.where(losses[i] < loss, xs[i], x)
            loss = torch.minimum(losses[i], loss)
        return x, loss

    def rescale(self, x: torch.Tensor) -> torch.Tensor:
        """Each token vector scaled to the target norm."""
        return x * (self.options.embedding_norm / x.norm(dim=-1, keepdim=True))

    def nearest_tokens(self, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Token ids: the known ones, and at content positions the nearest candidate by cosine."""
        vocab = F.normalize(self.embeddings[candidates], dim=-1)
        sims = F.normalize(x[self.mask], dim=-1) @ vocab.T
        ids = self.known_ids.clone()
        ids[self.mask] = candidates[sims.argmax(-1)]
        return ids


def reorder(n: int, kind: str, rng: random.Random) -> list[int]:
    """A new order of `n` content tokens after one random move of `kind`."""
    order = list(range(n))
    if kind == "swap":
        i, j = rng.randrange(n), rng.randrange(n)
        order[i], order[j] = order[j], order[i]
    elif kind == "move_token":
        token = order.pop(rng.randrange(n))
        order.insert(rng.randrange(n), token)
    elif kind == "move_span":
        start, end = sorted(rng.sample(range(n + 1), 2))
        span, rest = order[start:end], order[:start] + order[end:]
        at = rng.randrange(len(rest) + 1)
        order = rest[:at] + span + rest[at:]
    else:
        cut = rng.randrange(1, n)
        order = order[cut:] + order[:cut]
    return order


def _permute(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x` (B, L, H) reordered by `index` (..., B, L): out[..., b, i] = x[b, index[..., b, i]]."""
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
    return x[rows, index]


class GradMatchAttack(Attack):
    """Gradient matching on continuous embeddings (LAMP's cosine setup, no language model).

    `budget` scales the optimisation steps and both initial candidate counts (at least one
    each); the learning-rate schedule, move schedule and number of moves per try stay as set.
    """

    name = "gradmatch"
    Options = GradMatchOptions

    def _reconstruct(
        self,
        model: nn.Module,
        snapshot: GradientSnapshot,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        device: torch.device,
        budget: float,
    ) -> Reconstruction:
        opts = self.options
        matcher = GradientMatcher(model, snapshot, tokenizer, device, opts)
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        steps = max(1, round(opts.steps * budget))
        n_candidates = max(1, round(opts.init_candidates * budget))
        n_permutations = max(1, round(opts.init_permutations * budget))
        best_x, best_loss, init_loss = self._initialise(
            matcher, n_candidates, n_permutations, generator, rng
        )
        best_x, best_loss, trace, accepted = self._optimise(matcher, best_x, best_loss, steps, rng)
        trace_values = torch.stack(trace).tolist()
        ids = matcher.nearest_tokens(best_x, candidate_token_ids(tokenizer).to(device)).cpu()
        result = from_ids(
            tokenizer,
            snapshot,
            ids,
            self.name,
            self.options_dict(),
            {
                "regime": GRADIENT_MATCHING,
                "steps": steps,
                "init_candidates": n_candidates,
                "init_permutations": n_permutations,
                "init_loss": float(init_loss),
                "best_loss": float(best_loss),
                "final_loss": trace_values[-1],
                "moves_accepted": int(accepted),
            },
        )
        result.loss_trace = trace_values
        return result

    @staticmethod
    def _initialise(
        matcher: GradientMatcher,
        n_candidates: int,
        n_permutations: int,
        generator: torch.Generator,
        rng: random.Random,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best of `n_candidates` Gaussian starts, then the best of `n_permutations`
        content permutations of it: its embeddings and loss, and the Gaussian start's loss."""
        device, dtype = matcher.mask.device, matcher.embeddings.dtype
        shape = (*matcher.mask.shape, matcher.embeddings.shape[1])
        best_x = torch.zeros(shape, dtype=dtype, device=device)
        best_loss = torch.tensor(float("inf"), device=device)

        def gaussian(n: int) -> torch.Tensor:
            return matcher.rescale(torch.randn((n, *shape), generator=generator).to(device, dtype))

        best_x, best_loss = matcher.best_of(n_candidates, gaussian, best_x, best_loss)
        init_loss = best_loss

        def shuffled(n: int, start: torch.Tensor = best_x) -> torch.Tensor:
            orders = [
                [rng.sample(range(len(p)), len(p)) for p in matcher.positions] for _ in range(n)
            ]
            return _permute(start, matcher.reindex(orders))

        best_x, best_loss = matcher.best_of(n_permutations, shuffled, best_x, best_loss)
        return best_x, best_loss, init_loss

    def _optimise(
        self,
        matcher: GradientMatcher,
        best_x: torch.Tensor,
        best_loss: torch.Tensor,
        steps: int,
        rng: random.Random,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Adam from `best_x` with rounds of reordering moves; the best embeddings seen, their
        loss, every step's loss and how many moves were accepted."""
        opts = self.options
        x = best_x.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=opts.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, opts.lr_decay_every, opts.lr_decay)
        moves_from = round(opts.moves_start * steps)
        accepted = torch.zeros((), dtype=torch.long, device=best_x.device)
        trace = []
        for step in range(steps):
            loss = matcher.losses(x.unsqueeze(0), create_graph=True)[0]
            (x.grad,) = torch.autograd.grad(loss, [x])
            loss = loss.detach()
            best_x = torch.where(loss < best_loss, x.detach(), best_x)
            best_loss = torch.minimum(loss, best_loss)
            trace.append(loss)
            optimizer.step()
            schedule.step()
            if opts.moves and step >= moves_from and step % opts.moves_every == 0:
                accepted += self._try_moves(x, matcher, rng)
        return best_x, best_loss, trace, accepted

    def _try_moves(
        self, x: torch.Tensor, matcher: GradientMatcher, rng: random.Random
    ) -> torch.Tensor:
        """Per sentence, apply the best of `moves` random reorderings if it lowers the loss.

        Returns how many sentences changed, as a device tensor (no host sync).
        """
        current = x.detach()
        loss = matcher.losses(current.unsqueeze(0))[0].detach()
        accepted = torch.zeros((), dtype=torch.long, device=x.device)
        for b, pos in enumerate(matcher.positions):
            if len(pos) < 2:
                continue

            def moved(
                n: int, b: int = b, size: int = len(pos), start: torch.Tensor = current
            ) -> torch.Tensor:
                orders = [[list(range(len(p))) for p in matcher.positions] for _ in range(n)]
                for order in orders:
                    order[b] = reorder(size, MOVE_KINDS[rng.randrange(len(MOVE_KINDS))], rng)
                return _permute(start, matcher.reindex(orders))

            previous = loss
            current, loss = matcher.best_of(self.options.moves, moved, current, loss)
            accepted += (loss < previous).long()
        with torch.no_grad():
            x.copy_(current)
        return accepted
