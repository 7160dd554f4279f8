"""Which sentence each token belongs to, from layer-0 attention (query and key modules).

The row space of a layer-0 gradient tells which (word, slot) pairs occur but, with several
sentences, not which sentence holds them. Attention does: a token's backward signal is a
combination of its own sentence's keys (resp. queries). `Membership` scores a hypothesis by
that, and `assign` anneals over who holds which of the slots' tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from gradaudit.attacks.span.exact.screening import Slot, layer0_inputs
from gradaudit.model.families import ModelLayout, layout
from gradaudit.model.lora import split_part

PARTNERS = {"query": "key", "key": "query"}  # whose outputs a module's signals combine
MEMBERSHIP_EXACT = 1e-6  # a membership score this low is taken as the truth (~1e-12)
DEPENDENT = 1e-9  # singular value of the inputs, relative: an exact linear dependency
DEPENDENT_SHARE = 1e-3  # a row's weight in such a dependency that leaves its signal open
ANNEAL_STEPS = 50  # annealing moves per (shared slot, sentence)
ALONE_TRIES = 12  # descents of one sentence searched alone, while none is exact
ALONE_KICKS = 3  # descents from the best so far between two random starts
KICK = 4  # places redrawn for a descent from the best so far
TEMPERATURE = 0.03  # of the membership score (a sum of relative residuals), at the start
RUN = 8  # longest run of slots swapped between two sentences in one move
WINDOW_SPARE = 3  # a long sentence's token is tested against a head's width less this many


@dataclass
class Signals:
    """One hypothesis' distinct inputs, their backward signals and which rows each sentence holds.

    `rows[b]` indexes sentence `b`'s tokens into the distinct inputs; `tested` marks the rows
    whose signal belongs to one sentence and is determined by the gradient (not shared by two
    sentences, and not on an exact linear dependency among the inputs, where `G = D^T H`
    leaves the split of the signal open). `missing` marks a stand-in for places whose input
    was not found: it is neither tested nor a partner.
    """

    signals: torch.Tensor  # heads x distinct x head width
    partners: torch.Tensor  # heads x distinct x head width
    outputs: torch.Tensor  # the module's own (queries or keys), heads x distinct x head width
    rows: list[list[int]]
    # Plain lists, per distinct input: the annealing reads them one row at a time, hundreds of
    # thousands of times per batch.
    shared: list[bool]  # held by more than one sentence
    dependent: list[bool]
    missing: frozenset[int] = frozenset()
    tested: list[bool] = field(init=False)  # one sentence's, and fixed by the gradient

    def __post_init__(self) -> None:
        self.tested = [not s and not d for s, d in zip(self.shared, self.dependent)]
        for i in self.missing:
            self.tested[i] = False

    def present(self, rows: list[int]) -> list[int]:
        """`rows` without the stand-ins for missing inputs."""
        return [i for i in rows if i not in self.missing] if self.missing else rows


@dataclass
class Membership:
    """The membership test of a layer-0 query or key module.

    A hypothesis' distinct inputs `H` give each one's backward signal `D` from `G = D^T H`
    (least squares). Per head, a query signal lies in the span of its own sentence's key
    differences (softmax ignores a shared shift), a key signal in that of its sentence's
    queries. A sentence's score is the relative residual of its tested signals against those
    spans: ~0 for the truth and clearly above for a swapped token, even where the row space of
    `G` cannot tell them apart. A sentence longer than the head width spans every signal, so it
    scores 0 whatever it holds.
    """

    lay: ModelLayout
    component: str
    weight: torch.Tensor  # the partner's projection
    bias: torch.Tensor
    own_weight: torch.Tensor  # the module's own projection
    own_bias: torch.Tensor
    heads: int
    target: torch.Tensor
    batch: dict[str, torch.Tensor]
    window: bool = False  # test long sentences' tokens against their most attended (`span`)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        module: nn.Module,
        batch: dict[str, torch.Tensor],
        target: torch.Tensor,
    ) -> Membership | None:
        """The test for `module` when it is a layer's query or key projection, else None (also
        for a LoRA part: its signals are `B^T delta`, which mixes the heads)."""
        lay = layout(model)
        name = next(n for n, m in model.named_modules() if m is module)
        where = lay.locate(name)
        if where is None or where[0] not in PARTNERS or split_part(name)[1] is not None:
            return None
        partner = model.get_submodule(lay.component_name(PARTNERS[where[0]], where[1]))
        weight, bias = _projection(partner, target.device)
        own_weight, own_bias = _projection(module, target.device)
        heads = int(model.config.num_attention_heads)
        return cls(lay, where[0], weight, bias, own_weight, own_bias, heads, target.double(), batch)

    def signals(self, ids: torch.Tensor) -> Signals:
        """Distinct inputs of the hypothesis `ids` (batch x length) and their signals."""
        mask = self.batch["attention_mask"].bool()
        inputs, inverse = distinct_inputs(self.lay, self.batch, ids)
        signals = torch.linalg.lstsq(inputs.T, self.target.T, driver="gelsd").solution
        # Rows on an exact dependency (a word pair repeated at a pair of positions, e.g. two
        # punctuation marks) get an arbitrary share of the signal: leave them untested.
        left, sv, _ = torch.linalg.svd(inputs, full_matrices=True)
        dependent = left[:, int((sv > sv[0] * DEPENDENT).sum()) :].norm(dim=1) > DEPENDENT_SHARE
        shared = torch.bincount(inverse, minlength=len(inputs)) > 1
        rows = [r.tolist() for r in inverse.split(mask.sum(1).tolist())]
        return Signals(
            self.per_head(signals), *self.projections(inputs), rows, shared.tolist(),
            dependent.tolist(),
        )  # fmt: skip

    def per_head(self, matrix: torch.Tensor) -> torch.Tensor:
        """Rows (n x heads * head width) split per head: heads x n x head width."""
        return matrix.reshape(len(matrix), self.heads, -1).transpose(0, 1)

    def projections(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The partners (keys without their bias, which softmax ignores, or queries) and the
        module's own outputs of `inputs`, per head."""
        partners = inputs @ self.weight.T + (self.bias if self.component == "key" else 0)
        return self.per_head(partners), self.per_head(inputs @ self.own_weight.T + self.own_bias)

    def windowed(self) -> list[int]:
        """The sentences longer than a head (32 tokens in MiniLM): their partners span a
        head's whole width, so any signal lies in their span. With `window` each of their
        tokens is tested against the partners it attends to most: a ranking, not exact."""
        lengths = self.batch["attention_mask"].sum(1).tolist()
        return [b for b, n in enumerate(lengths) if self._longer_than_a_head(n)]

    def _longer_than_a_head(self, n: int) -> bool:
        """Whether a sentence of `n` tokens has partners spanning a head's whole width."""
        spare = 1 if self.component == "query" else 0  # a query signal uses key differences
        return n - spare >= self.weight.shape[0] // self.heads

    def span(self, state: Signals, rows: list[int]) -> torch.Tensor:
        """Orthonormal per-head basis (heads x head width x k) of one sentence's partners; with
        `window`, for a sentence longer than a head one per token (tokens x heads x head width
        x k), of the partners that token's attention weighs most."""
        rows = state.present(rows)
        vectors = state.partners[:, rows]
        if self.window and self._longer_than_a_head(len(rows)):
            return self.attended(state, rows, vectors.shape[-1] - WINDOW_SPARE)
        if self.component == "query":  # softmax ignores a shared shift: key differences
            vectors = vectors[:, 1:] - vectors[:, :1]
        return torch.linalg.qr(vectors.transpose(1, 2)).Q

    def attended(self, state: Signals, rows: list[int], size: int) -> torch.Tensor:
        """Per token and head of one sentence, the basis of the `size` partners with the most
        attention between them and the token (tokens x heads x head width x k). A signal is
        those partners' mix weighted by attention, so this leaves out only what the token's
        attention leaves out: the truth's residual ~1e-3, against 0.006-0.014 for a window of
        its nearest partners (SST-2 dev 8-11, 39 and 40 tokens)."""
        partners, outputs = state.partners[:, rows], state.outputs[:, rows]
        scale = partners.shape[-1] ** -0.5
        if self.component == "query":  # rows: the token's query over the sentence's keys
            attention = torch.softmax(outputs @ partners.transpose(1, 2) * scale, -1)
        else:  # a key's signal mixes the queries attending to it: the attention's columns
            attention = torch.softmax(partners @ outputs.transpose(1, 2) * scale, -1).mT
        top = attention.topk(size, -1).indices  # heads x tokens x size
        vectors = partners[torch.arange(len(partners))[:, None, None], top]
        if self.component == "query":
            vectors = vectors[..., 1:, :] - vectors[..., :1, :]
        return torch.linalg.qr(vectors.transpose(-1, -2)).Q.transpose(0, 1)

    def residual(self, state: Signals, members: list[int], span: torch.Tensor) -> float:
        """Relative residual of the `members`' signals against `span` (one basis)."""
        if not members:
            return 0.0
        sig = state.signals[:, members]
        res = sig - (sig @ span) @ span.transpose(1, 2)
        return float(res.square().sum() / sig.square().sum().clamp_min(1e-300))

    def sentence_residual(self, state: Signals, rows: list[int], span: torch.Tensor) -> float:
        """Relative residual of a sentence's tested signals against its `span`."""
        rows = state.present(rows)
        if span.dim() == 3:
            return self.residual(state, [i for i in rows if state.tested[i]], span)
        keep = [p for p, i in enumerate(rows) if state.tested[i]]
        if not keep:
            return 0.0
        sig = state.signals[:, [rows[p] for p in keep]].unsqueeze(-2)  # heads x m x 1 x hw
        basis = span[keep].transpose(0, 1)  # heads x m x hw x k
        res = sig - (sig @ basis) @ basis.transpose(-1, -2)
        return float(res.square().sum() / sig.square().sum().clamp_min(1e-300))

    def shared_score(
        self, state: Signals, rows: list[list[int]], spans: list[torch.Tensor]
    ) -> float:
        """Signals of rows two sentences share lie in the sum of the sentences' spans."""
        owners: dict[int, list[int]] = {}
        for b, rows_b in enumerate(rows):
            for i in rows_b:
                owners.setdefault(i, []).append(b)
        total = 0.0
        for i, bs in owners.items():
            if state.shared[i] and not state.dependent[i]:
                parts = [_own_basis(spans[b], state.present(rows[b]), i) for b in bs]
                union = torch.linalg.qr(torch.cat(parts, -1)).Q
                total += self.residual(state, [i], union)
        return total

    def score(self, state: Signals) -> tuple[list[float], list[torch.Tensor], float]:
        """Each sentence's score and span, and the shared rows' score; all ~0 when right."""
        spans = [self.span(state, rows) for rows in state.rows]
        own = [self.sentence_residual(state, rows, span) for rows, span in zip(state.rows, spans)]
        return own, spans, self.shared_score(state, state.rows, spans)


def _projection(module: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear module's weight and bias (0 without one), float64 on `device`."""
    weight = module.weight.detach().to(device, torch.float64)
    bias = module.bias.detach().to(weight) if module.bias is not None else weight.new_zeros(1)
    return weight, bias


def _own_basis(span: torch.Tensor, rows: list[int], i: int) -> torch.Tensor:
    """The basis a sentence tests its row `i` against (its window's, for a long sentence)."""
    return span if span.dim() == 3 else span[rows.index(i)]


def distinct_inputs(
    lay: ModelLayout, batch: dict[str, torch.Tensor], ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct layer-0 inputs (float64) of the hypothesis `ids` (eval mode: a token at a
    position and segment is one input, whoever holds it) and each real token's index into them,
    in the order of `ids[attention_mask]`."""
    mask = batch["attention_mask"].bool()
    positions = lay.position_ids(batch["attention_mask"])[mask]
    segments = batch["token_type_ids"][mask]
    tokens = ids[mask]
    code = (tokens * (positions.max() + 1) + positions) * (segments.max() + 1) + segments
    unique, inverse = torch.unique(code, return_inverse=True)
    first = torch.zeros(len(unique), dtype=torch.long, device=ids.device)
    first.scatter_(0, inverse, torch.arange(len(code), device=ids.device))
    offsets = lay.position_embeddings.weight.detach()[positions[first]]
    offsets = offsets + lay.token_type_embeddings.weight.detach()[segments[first]]
    return layer0_inputs(lay, tokens[first], offsets.to(torch.float64)), inverse


def assign(
    membership: Membership,
    ids: torch.Tensor,
    slots: list[Slot],
    pools: list[torch.Tensor],
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """Token per (sentence, slot) by simulated annealing on the membership score.

    Each slot keeps its pool's best tokens (one per sentence, in random order at the start),
    so the distinct inputs and their signals stay fixed: pool replacements would let the
    score drop by sharing rows or putting them on exact dependencies, which leaves them
    untested. Moves swap two sentences' tokens at a slot or along a run of up to `RUN` slots
    (a phrase in the wrong sentence); only the two sentences are rescored. Returns the best
    assignment seen and its score.
    """
    ids = ids.clone()
    for slot, pool in zip(slots, pools):
        order = torch.randperm(len(slot.sentences), generator=generator).tolist()
        for i, b in zip(order, slot.sentences):
            ids[b, slot.column] = pool[min(i, len(pool) - 1)]
    index = (membership.batch["attention_mask"].cumsum(1) - 1).tolist()  # column -> rows[b] index
    state = membership.signals(ids)
    own, spans, shared_score = membership.score(state)
    best_ids, best = ids, sum(own) + shared_score
    shared = [j for j, slot in enumerate(slots) if len(slot.sentences) > 1]
    steps = ANNEAL_STEPS * sum(len(slots[j].sentences) for j in shared)
    for step in range(steps if shared else 0):
        j = shared[_draw(len(shared), generator)]
        pair = torch.randperm(len(slots[j].sentences), generator=generator)[:2].tolist()
        b, c = (slots[j].sentences[i] for i in pair)
        cols = _run(slots, j, b, c, 1 + _draw(RUN, generator) if _draw(2, generator) else 1)
        if bool((ids[b, cols] == ids[c, cols]).all()):
            continue
        rows = list(state.rows)
        rows[b], rows[c] = list(rows[b]), list(rows[c])
        for col in cols:
            i, k = index[b][col], index[c][col]
            rows[b][i], rows[c][k] = rows[c][k], rows[b][i]
        trial_spans, trial_own = list(spans), list(own)
        for x in (b, c):
            trial_spans[x] = membership.span(state, rows[x])
            trial_own[x] = membership.sentence_residual(state, rows[x], trial_spans[x])
        trial_shared = shared_score
        if any(state.shared[rows[x][index[x][col]]] for x in (b, c) for col in cols):
            trial_shared = membership.shared_score(state, rows, trial_spans)
        change = sum(trial_own) + trial_shared - sum(own) - shared_score
        if _accept(change, TEMPERATURE * (1 - step / steps), generator):
            ids = ids.clone()
            ids[b, cols], ids[c, cols] = ids[c, cols], ids[b, cols]
            state.rows, spans, own, shared_score = rows, trial_spans, trial_own, trial_shared
            if sum(own) + shared_score < best:
                best_ids, best = ids, sum(own) + shared_score
                if best < MEMBERSHIP_EXACT:
                    break
    return best_ids, best


def search_alone(
    membership: Membership,
    state: Signals,
    options: list[list[int]],
    exact: float,
    generator: torch.Generator,
) -> tuple[list[int], float]:
    """One sentence's rows chosen on its own score alone: `options[p]` are the rows of `state`
    its place `p` may hold (those of every sentence sharing the place's slot). A sentence no
    longer than a head scores ~0 with its own rows only, whoever else holds what, so each can
    be searched by itself, a far smaller search than the batch's. Greedy descent (each place's
    best row, sweep after sweep), from a random start every `ALONE_KICKS + 1` tries and else
    from the best so far with `KICK` places redrawn; stops below `exact`. From the truth with
    up to 8 places redrawn the descent came back every time (Rotten Tomatoes 8-15, lengths
    12-28); from random starts 0-4 times in 5. Returns the best rows and score."""
    best_rows, best = [], float("inf")
    for attempt in range(ALONE_TRIES):
        if attempt % (ALONE_KICKS + 1) == 0:
            rows = [opts[_draw(len(opts), generator)] for opts in options]
        else:
            rows = list(best_rows)
            for p in torch.randperm(len(rows), generator=generator)[:KICK].tolist():
                rows[p] = options[p][_draw(len(options[p]), generator)]
        rows, score = _descend(membership, state, options, rows)
        if score < best:
            best_rows, best = rows, score
        if best < exact:
            break
    return best_rows, best


def _descend(
    membership: Membership, state: Signals, options: list[list[int]], rows: list[int]
) -> tuple[list[int], float]:
    """Each place in turn takes the row that lowers the sentence's score most, until none does."""

    def score(trial: list[int]) -> float:
        return membership.sentence_residual(state, trial, membership.span(state, trial))

    current = score(rows)
    improved = True
    while improved:
        improved = False
        for p, opts in enumerate(options):
            for row in opts:
                if row == rows[p]:
                    continue
                trial = list(rows)
                trial[p] = row
                trial_score = score(trial)
                if trial_score < current:
                    rows, current, improved = trial, trial_score, True
    return rows, current


def _run(slots: list[Slot], j: int, b: int, c: int, length: int) -> list[int]:
    """Columns of up to `length` consecutive slots from `slots[j]` that `b` and `c` share."""
    run = [j]
    while len(run) < length and run[-1] + 1 < len(slots):
        nxt = slots[run[-1] + 1]
        if nxt.column != slots[run[-1]].column + 1 or not {b, c} <= set(nxt.sentences):
            break
        run.append(run[-1] + 1)
    return [slots[k].column for k in run]


def _draw(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def _accept(change: float, temperature: float, generator: torch.Generator) -> bool:
    """Metropolis rule: always downhill, uphill with probability exp(-change / temperature)."""
    if change < 0:
        return True
    if temperature <= 0:
        return False
    return float(torch.rand(1, generator=generator)) < math.exp(-change / temperature)
