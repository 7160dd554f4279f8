"""Deep span mode: any linear module past layer 0 whose weight gradient has a usable span.

Method. The inputs `X` of a module (one row per real token of the batch) span the row space
`V` (r x d, orthonormal) of its weight gradient. A candidate batch is scored two ways, summed
over the observed modules:

- `outside`: `|X - X V^T V|^2 / |X|^2`, how far its inputs lie outside `V`;
- `uncovered`: `1 - |V Q|^2 / r` with `Q` an orthonormal basis of its inputs (QR), the mean
  squared residual of `V`'s basis vectors against the span of its inputs.

The first alone rewards repeating a few true words; the second rules that out. The truth scores
zero. A key gradient only holds inputs minus their sentence's mean (the attention weights'
signals sum to zero), so key inputs are centred per sentence first. When the rank is below the
number of (centred) rows, the inputs span more than `V`: `outside` then tests the content rows
alone if the rank covers them (every sentence's [CLS] input looks alike past layer 0, so at
B > 1 the special tokens' rows add fewer directions than rows), else only `uncovered` is used.

Each score runs the model's own forward only up to the deepest observed module (a forward
pre-hook captures the inputs and stops it). Search: Adam on the content positions' word
embeddings from a few random starts (all starts in one batch), the nearest tokens, then
coordinate descent. Each sweep, every position tries the `screen` best to first order of its
`neighbours` nearest tokens and the bag of all positions' `bag` nearest, plus the `linearised`
tokens of the whole vocabulary that lower the score most to first order (one backward pass at
the current tokens: these reach words the continuous search never came near); only the changed
sentence runs forward (up to its last real token), the others' module inputs are reused. Then
reorderings: swaps of two content tokens (across sentences too), moves of a token to another
slot of its sentence (the others shifting), exchanges of two runs of up to three tokens (a
misplaced phrase); then insertions: one token deleted and a new one inserted elsewhere in its
sentence, the tokens between shifting (a doubled word where a missing one belongs: no single
move improves that). At most `moves` of each kind per sweep: half the best to first order (one
backward ranks them all), half at random. Late in a search the words are right and their order
is not: once a sweep's replacements find nothing while its reorderings or insertions help, the
next sweeps put the replacements off until those stop helping. With several sentences, a
sweep leaves alone those whose own inputs lie in the span while another's stray outside it:
they are right, and their moves would cost as much as a wrong one's. Every candidate is scored in
batches of `forward_batch` sequences (with a rough objective, a copy of the model in bfloat16
ranks them first and only its best are scored in float32: `_take_best`), until `sweeps` ends or
a sweep changes nothing even with `WIDEST` times the linearised tokens (a stuck sweep widens
them `WIDEN`-fold) and then, in a search of one sentence, with each slot refined alone: Adam on
that slot's embedding, the rest fixed, and its nearest tokens tried as replacements and
insertions (first order can rank the missing word in the thousands; a joint search of several
sentences leaves this to their one-sentence searches, where each slot's copy runs one
sentence). An unsolved search is kicked: Adam again from starts drawn close around its tokens,
then coordinate descent from the best of those; still unsolved, the second-best fresh start is
searched. With several sentences their inputs jointly span `V`; if a joint search ends
unsolved, each sentence whose own inputs stray outside `V` (a test per sentence) is searched
again from fresh starts with the others held fixed, then, while that leaves more sentences
fitting, with only the sentences that fit held (a wrong sentence may hold the words another
needs). Lengths and special tokens are known structure.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradaudit.capture.snapshot import GradientSnapshot
from gradaudit.model.families import ModelLayout, layout


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
        # only its best are scored at full precision (`_take_best`).
        self.rough: SpanObjective | None = None
        if rough_dtype is not None:
            cheap = copy.deepcopy(model).to(rough_dtype)
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
        # Which rows `outside` tests per module: "real" (all), "content", or none.
        self.outside: dict[str, str | None] = {}
        for m, v in bases.items():
            slack = len(self.real) if self.centred[m] else 0
            fits = [k for k, rows in (("real", self.real), ("content", self.content))
                    if len(v) >= int(rows.sum()) - slack]  # fmt: skip
            self.outside[m] = fits[0] if fits else None
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
            x = self._centred(name, seen[name].to(self.precision), self.real)[0]
            x = x * self._rows(name, self.real, self.content).unsqueeze(-1)
            inside = (x @ self.bases[name].T).square().sum((1, 2))
            norm = x.square().sum((1, 2))
            total = total + torch.where(norm > 0, 1 - inside / norm, 0)  # no rows: nothing off
        return total

    def _rows(self, name: str, real: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """The rows (B, L) that `outside` tests at module `name`."""
        return real if self.outside[name] == "real" else content

    def _centred(self, name: str, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Inputs (K, B, L, d), minus their sentence's mean for a key module."""
        if not self.centred[name]:
            return x
        mask = real.unsqueeze(-1)
        return x - (x * mask).sum(-2, keepdim=True) / mask.sum(-2, keepdim=True)

    @functools.cached_property
    def spread(self) -> torch.Tensor:
        """Standard deviation (H,) of the vocabulary's embeddings per dimension (computed once:
        about 0.15 s for MiniLM's 30522 tokens on one CPU thread)."""
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
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                seen[name] = args[0]
                if len(seen) == len(self.bases):
                    raise _Stop

            return hook

        handles = [
            self.model.get_submodule(m).register_forward_pre_hook(keep(m)) for m in self.bases
        ]
        inputs = {n: v[rows, :width].repeat(k, 1) for n, v in self.inputs.items()}
        try:
            self.model(inputs_embeds=embeds.flatten(0, 1), **inputs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
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
            x = self._centred(name, x, real)
            q, _ = torch.linalg.qr(x[:, real].transpose(1, 2))  # rows (K, N, d)
            total = total + 1 - (basis @ q).square().sum((1, 2)) / basis.shape[0]
            if self.outside[name]:
                rows = x[:, self._rows(name, real, content)]
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
        `variants` (K, L). Only the variants run forward: the other sentences' inputs are
        shared, which makes a batch of B sentences B times cheaper to search than whole
        candidate batches."""
        with torch.no_grad():
            # A one-sentence batch has nothing to share: its variants are whole batches.
            base = self.module_inputs(self.embed(ids).unsqueeze(0)) if len(ids) > 1 else {}
            scores = []
            for part in variants.split(per_pass * len(ids)):
                changed = self.module_inputs(self.embed(part).unsqueeze(1), [sentence])
                merged = dict(changed)
                for name, x in base.items():
                    merged[name] = x.repeat(len(part), 1, 1, 1)
                    merged[name][:, sentence] = changed[name][:, 0]
                scores.append(self.score_inputs(merged))
            return torch.cat(scores)

    def score_ids(self, ids: torch.Tensor, per_pass: int) -> torch.Tensor:
        """Scores (K,) of K token-id batches (K, B, L), `per_pass` batches per forward."""
        with torch.no_grad():
            return torch.cat([self(self.embed(c)) for c in ids.split(per_pass)])


def _nearest(
    x: torch.Tensor, vocab: torch.Tensor, candidates: torch.Tensor, k: int
) -> torch.Tensor:
    """Ids (P, k) of the k candidate tokens nearest by cosine to each row of `x` (P, H)."""
    sims = F.normalize(x, dim=-1) @ vocab.T
    return candidates[sims.topk(min(k, len(candidates)), dim=-1).indices]


def _first_order_best(
    grad: torch.Tensor, vocab: torch.Tensor, candidates: torch.Tensor, k: int
) -> torch.Tensor:
    """Ids (n, k) of the tokens whose embedding most lowers the score at each of n slots with
    score gradients `grad` (n, H), to first order: replacing u by v changes it by about
    (e_v - e_u) . grad, so these reach words wherever they lie in embedding space."""
    return candidates[(grad @ vocab.T).topk(min(k, len(candidates)), largest=False).indices]


def _score_gradient(objective: SpanObjective, ids: torch.Tensor, per_pass: int) -> torch.Tensor:
    """Gradient (K, B, L, H) of each candidate's score with respect to its embeddings."""
    grads = []
    for part in ids.split(per_pass):
        x = objective.embed(part).requires_grad_(True)
        grads.append(torch.autograd.grad(objective(x).sum(), [x])[0])
    return torch.cat(grads)


def _slot_optima(
    objective: SpanObjective,
    trials: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    settings: DeepSettings,
) -> torch.Tensor:
    """Embedding (K, H) at one free slot of each candidate batch `trials` (K, B, L) (slot
    `rows[k], columns[k]`) that minimises its score, all other tokens fixed: Adam from the
    slot's token, `forward_batch` sequences at a time. Its nearest tokens rank a missing word
    where first order does not (MiniLM attn_output@4: "the" 2615th of 29523 to first order,
    1st here)."""
    rate = settings.lr * LR_SPREAD * float(objective.spread.mean())
    optima = []
    for part in torch.arange(len(trials), device=trials.device).split(
        max(1, settings.forward_batch // trials.shape[1])
    ):
        emb = objective.embed(trials[part])
        k, at = torch.arange(len(part), device=part.device), (rows[part], columns[part])
        start = emb[(k, *at)]
        u = torch.zeros_like(start, requires_grad=True)
        optimizer = torch.optim.Adam([u], lr=rate)
        for _ in range(settings.steps // REFINE_SHARE):
            xs = emb.index_put((k, *at), start + u)
            (u.grad,) = torch.autograd.grad(objective(xs).sum(), [u])
            optimizer.step()
        optima.append((start + u).detach())
    return torch.cat(optima)


def _shifts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index permutations (M, B * L) of the flattened batch that take one content token out
    and put it back elsewhere in its sentence (the tokens between shift by one), with the
    flat slot (M,) where it lands: that slot is opened for an insertion."""
    mask = mask.cpu()
    identity = torch.arange(mask.numel())
    perms, opened = [], []
    for b, row in enumerate(mask):
        slots = row.nonzero().flatten() + b * mask.shape[1]
        for i, j in itertools.permutations(range(len(slots)), 2):
            order = list(range(len(slots)))
            order.insert(j, order.pop(i))
            perm = identity.clone()
            perm[slots] = slots[order]
            perms.append(perm)
            opened.append(int(slots[j]))
    if not perms:
        return identity.unsqueeze(0)[:0], identity[:0]
    return torch.stack(perms), torch.tensor(opened)


def _first_order_gain(
    objective: SpanObjective, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score's gradient (N, H) at the N flat slots of `ids` (one backward) and `gain`
    (N, N): putting the token of slot q at slot p changes the score by about
    gain[p, q] - gain[p, p], so every reordering can be ranked before any is scored."""
    slope = _score_gradient(objective, ids.unsqueeze(0), 1)[0].flatten(0, 1)
    return slope, slope @ objective.embed(ids.flatten()).T


def _first_order_change(gain: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """First-order score change (M,) of each index permutation (M, N) of the flat slots."""
    return gain.gather(1, perms.T).sum(0) - gain.diagonal().sum()


def _promising(change: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `k` candidates: the half that lowers the score most to first order
    (`change`), the rest drawn at random. First order ranks a reordering well at some modules
    (query) and barely better than chance at others (attention output, FFN output, measured on
    MiniLM), so the random half keeps every move reachable."""
    if k >= len(change):
        return torch.arange(len(change), device=change.device)
    order = change.argsort()
    rest = order[k // 2 :]
    drawn = torch.randperm(len(rest), generator=generator)[: k - k // 2].to(rest.device)
    return torch.cat([order[: k // 2], rest[drawn]])


def _shifted_insertions(
    objective: SpanObjective,
    ids: torch.Tensor,
    shifts: tuple[torch.Tensor, torch.Tensor],
    vocab: torch.Tensor,
    candidates: torch.Tensor,
    settings: DeepSettings,
    generator: torch.Generator,
    refine: bool = False,
) -> torch.Tensor:
    """Candidates (M, B, L): one content token deleted and a new one inserted elsewhere in its
    sentence, the tokens between shifting by one. Fixes a missing word plus a doubled one, which
    no single replacement or reordering improves. `moves / inserts` shifts are tried
    (`_promising`: first order counts the shift plus the best token at the opened slot), each
    with the `inserts` best tokens to first order at its opened slot (a batched backward over
    the shifted sequences), and with `refine` also the `inserts` nearest to the slot's own
    optimum (`_slot_optima`).
    """
    perms, opened = (t.to(ids.device) for t in shifts)
    if not len(perms) or not settings.inserts:
        return ids.unsqueeze(0)[:0]
    slope, gain = _first_order_gain(objective, ids)
    best_token = (slope @ vocab.T).min(1).values  # (N,): the best insert at each slot
    moved = perms.gather(1, opened.unsqueeze(1)).squeeze(1)
    change = _first_order_change(gain, perms) + best_token[opened] - gain[opened, moved]
    chosen = _promising(change, max(1, settings.moves // settings.inserts), generator)
    trials = ids.flatten()[perms[chosen]].view(-1, *ids.shape)
    rows, columns = opened[chosen] // ids.shape[1], opened[chosen] % ids.shape[1]
    grad = _score_gradient(objective, trials, max(1, settings.forward_batch // ids.shape[0]))
    inserts = _first_order_best(
        grad[torch.arange(len(trials)), rows, columns], vocab, candidates, settings.inserts
    )
    if refine:
        optima = _slot_optima(objective, trials, rows, columns, settings)
        nearest = _nearest(optima, F.normalize(vocab, dim=-1), candidates, settings.inserts)
        inserts = torch.cat([inserts, nearest], 1)
    per = inserts.shape[1]
    out = trials.repeat_interleave(per, 0)
    out[torch.arange(len(out)), rows.repeat_interleave(per), columns.repeat_interleave(per)] = (
        inserts.flatten()
    )
    return out


SOLVED = 1e-8  # nothing to improve: the truth scores ~1e-13 in float64
SENTENCE_FITS = 1e-5  # a sentence's inputs this close to the span are taken as right
# Discrete searches while unsolved, in order: from the best-scoring fresh start, from a kick of
# the best result so far, from the second-best fresh start.
SEARCHES = ("start", "kick", "start")
KICK = 0.3  # spread of kicked restarts around their tokens, x the embeddings' spread
LR_SPREAD = 4.0  # step-size ratio between the last and the first continuous restart
BLOCK = 3  # longest run of tokens that an exchange moves as one
WIDEN = 4  # a sweep that changes nothing is retried with this many times more linearised tokens
WIDEST = 16  # ... up to this many times `linearised`; still stuck, one sweep refines
REFINE_SHARE = 3  # a refining sweep's one-slot searches run steps / REFINE_SHARE Adam steps
ROUGH_KEEP = 8  # of the candidates a rough objective ranks, scored again at full precision
ROUGH_NOISE = 3.0  # ... and those this many times its error on the current ids from its best


def _reorderings(mask: torch.Tensor) -> torch.Tensor:
    """Index permutations (M, B * L) of the flattened batch: every swap of two content tokens
    (across sentences too), every move of one content token to another slot of its sentence
    (the others shift), and every exchange of two runs of up to `BLOCK` tokens of a sentence
    of which one is longer than a token (a phrase put in the wrong place)."""
    mask = mask.cpu()
    identity = torch.arange(mask.numel())
    perms = []
    for i, j in torch.combinations(mask.flatten().nonzero().flatten(), 2).tolist():
        perm = identity.clone()
        perm[i], perm[j] = j, i
        perms.append(perm)
    for b, row in enumerate(mask):
        slots = row.nonzero().flatten() + b * mask.shape[1]
        for i, j in torch.combinations(torch.arange(len(slots)), 2).tolist():
            if j - i < 2:
                continue  # a move by one slot is a swap
            segment = slots[i : j + 1]
            for shifted in (segment.roll(1), segment.roll(-1)):
                perm = identity.clone()
                perm[segment] = shifted
                perms.append(perm)
        n = len(slots)
        for i in range(n):
            for first in range(1, BLOCK + 1):
                for j in range(i + first, n):
                    for second in range(1, min(BLOCK, n - j) + 1):
                        if first == second == 1:
                            continue  # a swap
                        order = torch.arange(n)
                        order = torch.cat(
                            [
                                order[:i],
                                order[j : j + second],
                                order[i + first : j],
                                order[i : i + first],
                                order[j + second :],
                            ]
                        )
                        perm = identity.clone()
                        perm[slots] = slots[order]
                        perms.append(perm)
    return torch.stack(perms) if perms else identity.unsqueeze(0)[:0]


def _continuous(
    objective: SpanObjective,
    settings: DeepSettings,
    generator: torch.Generator,
    around: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam from `restarts` random starts at once; the embeddings (K, B, L, H) and scores.

    The starts are spread over the vocabulary's embeddings, or, with `around` (token ids
    (B, L)), drawn `KICK` times as tightly around those tokens' embeddings."""
    emb = objective.embeddings
    shape = (settings.restarts, *objective.content.shape, emb.shape[1])
    start = torch.randn(shape, generator=generator, dtype=emb.dtype).to(emb.device)
    scale = objective.spread
    if around is None:
        origin = start * scale + emb.mean(0)
    else:
        origin = start * (KICK * scale) + objective.embed(around)
    # Restart steps spread geometrically from lr to LR_SPREAD * lr: the step size that
    # escapes poor starts differs between modules and sentences. Adam ignores the
    # gradient's scale, so optimising u in x = origin + lr_k * u at unit rate is Adam on x
    # at rate lr_k.
    spread = torch.arange(len(origin), dtype=torch.float64) / max(1, len(origin) - 1)
    rates = settings.lr * float(scale.mean()) * LR_SPREAD**spread
    rates = rates.to(origin).view(-1, *[1] * (origin.dim() - 1))
    u = torch.zeros_like(origin, requires_grad=True)
    optimizer = torch.optim.Adam([u], lr=1.0)
    for _ in range(settings.steps):
        loss = objective(origin + rates * u).sum()
        (u.grad,) = torch.autograd.grad(loss, [u])
        optimizer.step()
    x = (origin + rates * u).detach()
    with torch.no_grad():
        return x, objective(x)


def _rounded(
    objective: SpanObjective,
    x: torch.Tensor,
    vocab: torch.Tensor,
    candidates: torch.Tensor,
    per_pass: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (K, B, L) nearest to continuous solutions `x` (K, B, L, H), and their scores."""
    mask = objective.content
    near = torch.stack([_nearest(xk[mask], vocab, candidates, 1)[:, 0] for xk in x])
    starts = objective.known_ids.repeat(len(x), 1, 1)
    starts[:, mask] = near
    return starts, objective.score_ids(starts, per_pass)


def _kicked(
    objective: SpanObjective,
    ids: torch.Tensor,
    vocab: torch.Tensor,
    candidates: torch.Tensor,
    settings: DeepSettings,
    per_pass: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A new start near a stuck result `ids` (B, L): its ids, score and continuous source,
    the best of continuous restarts drawn around `ids`' embeddings."""
    x, _ = _continuous(objective, settings, generator, around=ids)
    starts, scores = _rounded(objective, x, vocab, candidates, per_pass)
    k = int(scores.argmin())
    return starts[k], scores[k], x[k]


def deep_search(
    objective: SpanObjective,
    candidates: torch.Tensor,
    settings: DeepSettings,
    seed: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids (B, L) minimising `objective` over `candidates` at content positions."""
    device = objective.content.device
    generator = torch.Generator().manual_seed(seed)
    candidates = candidates.to(device)
    raw_vocab = objective.embeddings[candidates]
    vocab = F.normalize(raw_vocab, dim=-1)
    x, continuous = _continuous(objective, settings, generator)
    per_pass = max(1, settings.forward_batch // objective.content.shape[0])
    starts, start_scores = _rounded(objective, x, vocab, candidates, per_pass)
    # Discrete searches (`SEARCHES`) until solved. A kick restarts the continuous search
    # around the best result's tokens: a stuck result is mostly right and its fix changes
    # several tokens at once, which continuous steps do and single discrete moves do not (two
    # stuck MiniLM sentences at attn_output@3 and @4 solved by one kick, one of them by the
    # second-best fresh start). A fresh start finds what a kick cannot reach (a view's
    # three-token sentence with its middle word wrong). With several sentences, the wrong
    # ones are searched again before the next search: cheaper than a joint search, which
    # mostly gets the same sentences right.
    order = start_scores.argsort().tolist()
    ids, current, sweeps, searched, kicks = starts[order[0]], start_scores[order[0]], 0, 0, []
    fresh = iter(order)
    again: list[int] = []
    for kind in SEARCHES:
        if kind == "kick":
            start, start_score, source = _kicked(
                objective, ids, vocab, candidates, settings, per_pass, generator
            )
            kicks.append(float(start_score))
        elif (k := next(fresh, None)) is not None:
            start, start_score, source = starts[k], start_scores[k], x[k]
        else:
            continue  # fewer restarts than fresh starts in `SEARCHES`
        found, score, done = _discrete(
            objective, start, start_score, source, vocab, raw_vocab, candidates, settings,
            per_pass, generator,
        )  # fmt: skip
        sweeps, searched = sweeps + done, searched + 1
        if len(found) > 1 and not objective.finished(found, score):
            found, score, replaced = _search_sentences_again(
                objective, found, score, candidates, settings, seed + searched * len(found)
            )
            again += replaced
        if bool(score <= current):
            ids, current = found, score
        if objective.finished(ids, current):
            break
    details = {
        "continuous_residuals": continuous.tolist(),
        "start_residuals": start_scores.tolist(),
        "searches": searched,
        "kicked_start_residuals": kicks,
        "sweeps": sweeps,
    }
    if len(ids) > 1:
        details["sentences_searched_again"] = again
    return ids, {**details, "residual": float(current)}


def _search_sentences_again(
    objective: SpanObjective,
    ids: torch.Tensor,
    current: torch.Tensor,
    candidates: torch.Tensor,
    settings: DeepSettings,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each sentence whose inputs stray outside the observed span, worst first, searched
    again from fresh starts with the others held fixed; kept where the batch's score drops.

    The joint search gets stuck with some sentences right and others not; a wrong sentence is
    then a one-sentence search whose rows must cover what the right ones leave uncovered. A
    wrong sentence can hold the very words another one needs (two short sentences, each in
    the other's slot), so later passes hold only the sentences that fit and leave the other
    wrong ones out; a sentence is kept there where its own inputs fit better, a pass only if
    the batch's score drops, and such passes go on while more sentences fit (a sentence
    searched next to a left-out one may need the pass after that one fits). Returns the ids,
    their score and the sentences replaced."""
    replaced: list[int] = []
    hold_wrong, fitting = True, 0
    while True:
        outside = objective.sentence_outside(ids)
        if outside is None or objective.finished(ids, current):
            break
        fits = outside <= SENTENCE_FITS
        if not hold_wrong:
            if int(fits.sum()) <= fitting:
                break
            fitting = int(fits.sum())
        tried, score, changed = ids, current, []
        for b in outside.argsort(descending=True).tolist():
            if bool(fits[b]):
                break
            held = [c for c in range(len(ids)) if c != b and (hold_wrong or bool(fits[c]))]
            view = objective.holding(tried, b, held)
            found, info = deep_search(view, candidates, settings, seed + b)
            own = view.sentence_outside(found)[0]  # the view runs sentence b alone
            trial = tried.clone()
            trial[b] = found[0]
            # Held others: the view scores the whole batch; left out: only its own fit counts.
            better = info["residual"] < float(score) if hold_wrong else bool(own < outside[b])
            if better:
                tried, score = trial, objective.score_ids(trial.unsqueeze(0), 1)[0]
                fits[b] = own <= SENTENCE_FITS
                changed.append(b)
        if bool(score < current):  # a pass that leaves the batch worse is dropped
            ids, current, replaced = tried, score, replaced + changed
        hold_wrong = False
    return ids, current, replaced


def _discrete(
    objective: SpanObjective,
    ids: torch.Tensor,
    current: torch.Tensor,
    x: torch.Tensor,
    vocab: torch.Tensor,
    raw_vocab: torch.Tensor,
    candidates: torch.Tensor,
    settings: DeepSettings,
    per_pass: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Coordinate descent over tokens from `ids` (whose continuous source is `x`).

    Returns the ids, their score and the sweeps run.
    """
    mask = objective.content
    top = _nearest(x[mask], vocab, candidates, max(settings.neighbours, settings.bag))
    bag = top[:, : settings.bag].flatten().unique()
    positions = mask.nonzero().tolist()
    pools = [torch.cat([top[i, : settings.neighbours], bag]).unique() for i in range(len(top))]
    moves, shifts = _reorderings(mask).to(ids.device), _shifts(mask)
    identity = torch.arange(mask.numel(), device=ids.device)
    moved = (moves != identity).view(len(moves), *mask.shape).any(-1)  # sentences each changes
    sweeps, width, refine, solved = 0, settings.linearised, False, False

    def replacements(
        ids: torch.Tensor, current: torch.Tensor, width: int, refine: bool
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Each position of the open sentences in turn takes the best of its candidate tokens
        (`width` of them linearised, with each slot's own optimum's nearest if `refine`);
        solved or not."""
        slopes = _score_gradient(objective, ids.unsqueeze(0), 1)[0][mask]
        linearised = _first_order_best(slopes, raw_vocab, candidates, width)
        if refine:  # stuck at the widest first-order ranks: each slot's own optimum
            where = mask.nonzero()
            optima = _slot_optima(objective, ids.repeat(len(where), 1, 1), *where.T, settings)
            nearest = _nearest(optima, vocab, candidates, settings.linearised)
            linearised = torch.cat([linearised, nearest], 1)
        searched = _open_sentences(objective, ids)
        for (b, p), pool, extra, slope in zip(positions, pools, linearised, slopes):
            if not searched[b]:
                continue
            if settings.screen and len(pool) > settings.screen:
                pool = pool[(objective.embed(pool) @ slope).topk(settings.screen, largest=False)[1]]
            pool = torch.cat([pool, extra]).unique()
            trial = ids.repeat(len(pool), 1, 1)
            trial[:, b, p] = pool
            ids, current = _take_best(objective, trial, per_pass, ids, current)
            # Once solved, the rest of the sweep (and its costlier moves) cannot improve it.
            if objective.finished(ids, current):
                return ids, current, True
        return ids, current, False

    # Late in a search the words are right and their order is not: replacements find nothing
    # while each sweep's reordering or insertion still helps. Their pass is then put off
    # until those stop helping; wherever it would have found nothing, the search takes the
    # same moves as with it.
    replace = True
    for _ in range(settings.sweeps):
        before = current
        if replace:
            ids, current, solved = replacements(ids, current, width, refine)
        replaced = current < before
        if len(moves) and not solved:
            searched = torch.tensor(_open_sentences(objective, ids), device=ids.device)
            allowed = moves[~moved[:, ~searched].any(1)]
            change = _first_order_change(_first_order_gain(objective, ids)[1], allowed)
            chosen = allowed[_promising(change, settings.moves, generator)]
            trial = ids.flatten()[chosen].view(len(chosen), *ids.shape)
            ids, current = _take_best(objective, trial, per_pass, ids, current)
            solved = objective.finished(ids, current)
        if not solved:
            searched = _open_sentences(objective, ids)
            shifted = _shifted_insertions(
                objective, ids, _within(shifts, searched, ids.shape[1]), raw_vocab, candidates,
                settings, generator, refine,
            )  # fmt: skip
            ids, current = _take_best(objective, shifted, per_pass, ids, current)
            solved = objective.finished(ids, current)
        if not (replace or solved or bool(current < before)):
            ids, current, solved = replacements(ids, current, width, refine)  # put off till now
            replaced = current < before
        sweeps += 1
        if solved:
            break
        improved = bool(current < before)
        replace = bool(replaced) or not improved
        if improved:
            width, refine = settings.linearised, False
        elif width < settings.linearised * WIDEST:
            width *= WIDEN  # stuck: the missing token is often just beyond the linearised few
        elif not refine and settings.steps >= REFINE_SHARE and len(ids) == 1:
            refine = True  # one sentence (B = 1 or a view): each slot's copy runs one sentence
        else:
            break
    return ids, current, sweeps


def _open_sentences(objective: SpanObjective, ids: torch.Tensor) -> list[bool]:
    """Which sentences of `ids` (B, L) a sweep still searches: with several, those whose own
    inputs stray outside the span while another's lie in it (a sentence that fits is right,
    and trying its replacements and reorderings costs as much as a wrong one's); all of them
    otherwise."""
    outside = objective.sentence_outside(ids) if len(ids) > 1 else None
    if outside is None:
        return [True] * len(ids)
    open_ = (outside > SENTENCE_FITS).tolist()
    return open_ if any(open_) else [True] * len(ids)


def _within(
    shifts: tuple[torch.Tensor, torch.Tensor], searched: list[bool], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `shifts` (see `_shifts`) whose sentence is `searched`."""
    perms, opened = shifts
    keep = torch.tensor(searched)[opened // length]
    return perms[keep], opened[keep]


def _take_best(
    objective: SpanObjective,
    trial: torch.Tensor,
    per_pass: int,
    ids: torch.Tensor,
    current: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids` or the best of `trial` (K, B, L) if it scores lower.

    With a rough objective, it ranks the candidates and only its best are scored at full
    precision (a move is taken on its full-precision score alone): the `ROUGH_KEEP` best, and
    every one it cannot tell from its best, `ROUGH_NOISE` times its error on `ids` away (where
    the candidates' scores differ by less than its precision, all of them).
    """
    if not len(trial):  # e.g. deep_moves=0
        return ids, current
    if objective.rough is not None and len(trial) > ROUGH_KEEP:
        rough = _scores(objective.rough, torch.cat([ids.unsqueeze(0), trial]), per_pass, ids)
        error, rough = (rough[0] - current).abs(), rough[1:]
        keep = rough <= rough.min() + ROUGH_NOISE * error
        keep[rough.topk(ROUGH_KEEP, largest=False).indices] = True
        trial = trial[keep]
    scores = _scores(objective, trial, per_pass, ids)
    i = scores.argmin()
    better = scores[i] < current
    return torch.where(better, trial[i], ids), torch.minimum(scores[i], current)


def _scores(
    objective: SpanObjective, trial: torch.Tensor, per_pass: int, ids: torch.Tensor
) -> torch.Tensor:
    """Scores (K,) of candidate batches `trial` (K, B, L) near `ids`. A candidate that changes
    one sentence is scored by running that sentence alone (see `score_variants`); one host
    sync per call sorts them out."""
    changed = (trial != ids).any(-1)  # (K, B)
    alone = changed.sum(1) == 1
    scores = torch.empty(len(trial), dtype=objective.precision, device=ids.device)
    for b in range(ids.shape[0]):
        rows = (alone & changed[:, b]).nonzero().flatten()
        if len(rows):
            scores[rows] = objective.score_variants(ids, b, trial[rows, b], per_pass)
    rows = (~alone).nonzero().flatten()
    if len(rows):
        scores[rows] = objective.score_ids(trial[rows], per_pass)
    return scores
