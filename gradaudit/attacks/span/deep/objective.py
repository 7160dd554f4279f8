"""Deep mode's objective: how far a candidate batch's module inputs are from the observed spans.

The inputs `X` of a linear module (one row per real token) span the row space `V` of its
weight gradient. A candidate is scored, summed over the observed modules, by `outside`
(`|X - X V^T V|^2 / |X|^2`: its inputs' distance from `V`) and `uncovered` (`1 - |V Q|^2 / r`,
`Q` a basis of its inputs: how much of `V` they leave out). The first alone rewards repeating
a few true words; the second rules that out. The truth scores zero.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradaudit.attacks.precision import rough_twin
from gradaudit.attacks.span.deep.shared import other_rows, scores_with_shared, shared_parts
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.families import ModelLayout, layout

SOLVED = 1e-8  # nothing to improve: the truth scores ~1e-13 in float64
SENTENCE_FITS = 1e-5  # a sentence's inputs this close to the span are taken as right


@dataclass
class DeepSettings:
    """Search sizes of deep mode (already scaled by the budget)."""

    steps: int
    restarts: int
    lr: float
    neighbours: int
    bag: int
    linearised: int
    screen: int
    inserts: int
    sweeps: int
    moves: int
    forward_batch: int
    deadline: float = math.inf  # a `time.perf_counter()` value: past it, the search stops
    stopped: bool = False  # a stage stopped at the deadline
    noisy: bool = False  # the gradient was taken with dropout on: no candidate scores 0

    def expired(self) -> bool:
        """Past the deadline: every stage returns its best so far (and `stopped` says so)."""
        self.stopped = self.stopped or time.perf_counter() > self.deadline
        return self.stopped


class _Stop(Exception):
    """Raised by the last input hook: nothing past the observed modules is computed."""


class SpanObjective:
    """Two-way span mismatch of candidate batches against the observed row spaces, with the
    subspace algebra in `precision` (float64; a rough twin's in float32)."""

    def __init__(
        self,
        model: nn.Module,
        lay: ModelLayout,
        snapshot: GradientSnapshot,
        bases: dict[str, torch.Tensor],
        content: torch.Tensor,
        device: torch.device,
        rough_dtype: torch.dtype | None = None,
        precision: torch.dtype = torch.float64,
    ) -> None:
        self.model = model
        # A copy of this objective over the model in a cheaper dtype: it ranks candidates, and
        # only its best are scored at full precision (`take_best`).
        self.rough: SpanObjective | None = None
        cheap = rough_twin(model, rough_dtype)
        if cheap is not None:
            # Its scores are only as precise as its model: float32 subspace algebra suffices.
            self.rough = SpanObjective(
                cheap, layout(cheap), snapshot, bases, content, device, precision=torch.float32
            )
        self.precision = precision
        self.bases = {m: v.to(device, precision) for m, v in bases.items()}
        self.centred = {m: (lay.locate(m) or ("", 0))[0] == "key" for m in bases}
        batch = {k: v.to(device) for k, v in snapshot.batch.items()}
        self.real = batch["attention_mask"].bool()
        # Each sentence's length up to its last real token (one host sync, here).
        last = (self.real * torch.arange(1, self.real.shape[1] + 1, device=device)).amax(-1)
        self.widths: list[int] = last.tolist()
        self.content = content.to(device)
        self.outside = outside_rows(bases, self.centred, self.real, self.content)
        self.embeddings = lay.word_embeddings.weight.detach()
        self.known_ids = batch["input_ids"].masked_fill(self.content, 0)
        self.inputs = {
            "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"],
            "position_ids": lay.position_ids(batch["attention_mask"]),
        }
        # A one-sentence view of the batch (`holding`), the module inputs (S, L, d) of the
        # sentences it holds fixed, and their masks.
        self.alone = False
        self.fixed: dict[str, torch.Tensor] = {}
        self.fixed_real, self.fixed_content = self.real[:0], self.content[:0]

    def holding(self, ids: torch.Tensor, sentence: int, held: list[int]) -> SpanObjective:
        """This objective over `sentence` of `ids` alone, with the sentences `held` fixed at
        `ids` (their module inputs computed once) and any others left out: a one-sentence
        search inside its batch."""
        view = copy.copy(self)
        view.rough = self.rough.holding(ids, sentence, held) if self.rough else None
        view.alone, view.fixed = True, {}
        if held:
            with torch.no_grad():
                seen = self.module_inputs(self.embed(ids[held]).unsqueeze(0), held)
            view.fixed = {m: x[0] for m, x in seen.items()}
        view.fixed_real, view.fixed_content = self.real[held], self.content[held]
        keep = slice(sentence, sentence + 1)
        view.real, view.content = self.real[keep], self.content[keep]
        view.widths = self.widths[keep]
        view.known_ids = ids[keep].masked_fill(view.content, 0)
        view.inputs = {n: v[keep] for n, v in self.inputs.items()}
        return view

    def finished(self, ids: torch.Tensor, score: torch.Tensor) -> bool:
        """Nothing left to improve: the batch scores ~0, or, in a one-sentence view
        (`holding`), the sentence's own inputs lie in the span (sentences left out of the
        view keep its score above 0)."""
        if bool(score < SOLVED):
            return True
        outside = self.sentence_outside(ids) if self.alone else None
        return outside is not None and bool(outside[0] < SENTENCE_FITS)

    def sentence_outside(self, ids: torch.Tensor) -> torch.Tensor | None:
        """How far each sentence's inputs lie outside the observed spans (B,), ~0 for a true
        sentence; None where no module's span bounds its inputs (rank below the rows)."""
        tested = [m for m in self.bases if self.outside[m]]
        if not tested:
            return None
        with torch.no_grad():
            seen = self.module_inputs(self.embed(ids).unsqueeze(0))
        total = 0
        for name in tested:
            x = self.centre(name, seen[name].to(self.precision), self.real)[0]
            x = x * self.tested_rows(name, self.real, self.content).unsqueeze(-1)
            inside = (x @ self.bases[name].T).square().sum((1, 2))
            norm = x.square().sum((1, 2))
            total = total + torch.where(norm > 0, 1 - inside / norm, 0)  # no rows: nothing off
        return total

    def tested_rows(self, name: str, real: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """The rows (B, L) that `outside` tests at module `name`."""
        return real if self.outside[name] == "real" else content

    def spanning_rows(self, name: str, real: torch.Tensor) -> torch.Tensor:
        """The rows (B, L) whose span `uncovered` measures: the real ones, less each
        sentence's last for a key module (centred, a sentence's rows sum to zero: without
        one of them the rest span as much and a QR leaves no column to rounding)."""
        if not self.centred[name]:
            return real
        count = real.cumsum(-1)
        return real & (count < count[..., -1:])

    def centre(self, name: str, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Inputs (K, B, L, d), minus their sentence's mean for a key module."""
        if not self.centred[name]:
            return x
        mask = real.unsqueeze(-1)
        return x - (x * mask).sum(-2, keepdim=True) / mask.sum(-2, keepdim=True)

    @functools.cached_property
    def spread(self) -> torch.Tensor:
        """Standard deviation (H,) of the vocabulary's embeddings per dimension (computed once,
        on first use)."""
        return self.embeddings.std(0)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (..., B, L, H) of token ids (..., B, L)."""
        return self.embeddings[ids]

    def module_inputs(
        self, xs: torch.Tensor, sentences: list[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Inputs (K, S, L, d) of each observed module for candidate embeddings `xs`
        (K, S, L, H) of the batch's `sentences` (all by default); content rows of `xs` count."""
        rows = slice(None) if sentences is None else sentences
        k, length = xs.shape[0], xs.shape[2]
        # Positions past the last real token of these sentences are padding, which no score
        # reads: run the forward without them (a short sentence of a batch runs at its own
        # length) and give them zero inputs.
        width = max(self.widths if sentences is None else [self.widths[r] for r in sentences])
        known = self.embed(self.known_ids[rows, :width])
        embeds = torch.where(self.content[rows, :width].unsqueeze(-1), xs[..., :width, :], known)
        inputs = {n: v[rows, :width].repeat(k, 1) for n, v in self.inputs.items()}
        seen = run_to_modules(self.model, list(self.bases), embeds.flatten(0, 1), inputs)
        return {
            m: F.pad(x.reshape(k, *embeds.shape[1:3], -1), (0, 0, 0, length - width))
            for m, x in seen.items()
        }

    def score_inputs(self, seen: dict[str, torch.Tensor]) -> torch.Tensor:
        """Score (K,) of the whole batch's module inputs (K, B, L, d) per module."""
        total = 0
        real = torch.cat([self.real, self.fixed_real])
        content = torch.cat([self.content, self.fixed_content])
        for name, basis in self.bases.items():
            x = seen[name].to(self.precision)
            if self.fixed:
                fixed = self.fixed[name].to(x).expand(len(x), -1, -1, -1)
                x = torch.cat([x, fixed], 1)
            x = self.centre(name, x, real)
            q, _ = torch.linalg.qr(x[:, self.spanning_rows(name, real)].transpose(1, 2))
            total = total + 1 - (basis @ q).square().sum((1, 2)) / basis.shape[0]
            if self.outside[name]:
                rows = x[:, self.tested_rows(name, real, content)]
                inside = (rows @ basis.T).square().sum((1, 2))
                total = total + 1 - inside / rows.square().sum((1, 2))
        return total

    def __call__(self, xs: torch.Tensor) -> torch.Tensor:
        """Score (K,) of K candidate batches `xs` (K, B, L, H); content rows of `xs` are used."""
        return self.score_inputs(self.module_inputs(xs))

    def score_variants(
        self, ids: torch.Tensor, sentence: int, variants: torch.Tensor, per_pass: int
    ) -> torch.Tensor:
        """Scores (K,) of batch `ids` (B, L) with sentence `sentence` replaced by each of
        `variants` (K, L). Only the variants run forward, and only their own rows enter each
        score's subspace algebra (the other sentences' share is computed once, `shared.py`):
        a batch of B sentences is far cheaper to search than whole candidate batches."""
        with torch.no_grad():
            parts = shared_parts(self, *other_rows(self, ids, sentence))
            real, content = self.real[sentence], self.content[sentence]
            scores = []
            for part in variants.split(per_pass * len(ids)):
                seen = self.module_inputs(self.embed(part).unsqueeze(1), [sentence])
                own = {m: x[:, 0] for m, x in seen.items()}
                scores.append(scores_with_shared(self, parts, own, real, content))
            return torch.cat(scores)

    def score_ids(self, ids: torch.Tensor, per_pass: int) -> torch.Tensor:
        """Scores (K,) of K token-id batches (K, B, L), `per_pass` batches per forward."""
        with torch.no_grad():
            return torch.cat([self(self.embed(c)) for c in ids.split(per_pass)])


def outside_rows(
    bases: dict[str, torch.Tensor],
    centred: dict[str, bool],
    real: torch.Tensor,
    content: torch.Tensor,
) -> dict[str, str | None]:
    """Which rows `outside` tests per module: "real" (all), "content", or None.

    When the rank is below the number of (centred) rows, the inputs span more than `V`; the
    content rows alone may still fit (past layer 0 every sentence's [CLS] input looks alike),
    else only `uncovered` can be used.
    """
    outside: dict[str, str | None] = {}
    for m, v in bases.items():
        slack = len(real) if centred[m] else 0
        fits = [k for k, rows in (("real", real), ("content", content))
                if len(v) >= int(rows.sum()) - slack]  # fmt: skip
        outside[m] = fits[0] if fits else None
    return outside


def run_to_modules(
    model: nn.Module, names: list[str], embeds: torch.Tensor, inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inputs of the modules `names` in a forward pass of `model` on `embeds`; the pass
    stops at the last of them, so nothing past the observed modules is computed."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0]
            if len(seen) == len(names):
                raise _Stop

        return hook

    handles = [model.get_submodule(m).register_forward_pre_hook(keep(m)) for m in names]
    try:
        model(inputs_embeds=embeds, **inputs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen
