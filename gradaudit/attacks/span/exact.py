"""Exact span mode: layer-0 query/key/value of an absolute-position encoder.

Method. The input of these modules is a per-token function of (token, position, segment),
`x = LayerNorm(E[v] + P[t] + T[s])`, and the rows of the weight gradient span exactly the
inputs of the batch's tokens. Every candidate token `v` is tested at every occupied slot
`(t, s)` by its normalised residual `|x - V^T V x| / |x|` against the row space `V`:

- screening in float64 with matmuls only, vocabulary chunk by chunk (`chunk` rows at a time;
  LayerNorm's mean, scale and the projection are expanded into inner products, so no
  vocab x slots x width tensor exists), keeping the best `n + 2` tokens per slot;
- a key gradient holds only differences of inputs (each sentence's key signals sum to zero),
  so the known special tokens' inputs are added to the basis first (`extend_basis`);
- the kept ones are recomputed exactly; a slot shared by `n` sentences holds `k <= n`
  distinct tokens, `k` being where the sorted residuals jump the most.

With one sentence that is the text. With several, the row space stops deciding. Before LayerNorm
an input is word part + position part, so for a word v and a position t joined by a path in the
batch's word-position graph, E[v] + P[t] is a signed sum of true inputs. LayerNorm's scale
breaks that only while beta lies outside the span, and one cycle in the graph (a word pair
repeated at a pair of positions, common from B = 4 on SST-2) puts beta inside it: then every
word of a connected component fits every position of it exactly (SST-2 dev sentences 13-16 as
one batch: median residual of the false (word, position) pairs 2.5e-15 in float64, as low as the
truth's). What stays exact is which words occur, and the gradient's values say more: split over
word and slot parts (`span_words`), they give each word's and each slot's share, which places
the words met once (47 and 68 tokens on SST-2 dev sentences 12-15 and 8-11, all where they sit).
Placed words lead their slots' pools and leave all others; the search never replaces them, only
moves them between the sentences sharing the slot. For query and key modules, `Membership`
scores a hypothesis by the attention structure instead (per head, a token's backward signal lies
in the span of its own sentence's keys, resp. queries): ~1e-12 for the truth, 1e-3 and up for
one swapped token (in a sentence of 25-29 tokens, 1e-6 and up for one replaced token: SST-2 dev
sentences 12-15, truth 3e-12). The signals are fixed once the slots' tokens are (each slot keeps
its pool's best `n`), so `assign` anneals over who holds which token: swaps of one slot or of a
run of slots between two sentences, each rescoring just those two sentences (a few random
restarts). Whole sentences of equal length are then ordered by the gradient match (the
membership test is label-blind), and the result is kept if its relative gradient residual is
below `EXACT_RESIDUAL`. Otherwise, and for value modules, each slot's pool is searched
coordinate by coordinate from there (replace a token, or swap two sentences' tokens at a slot),
each move scored by the full gradient match `|sum_b G_b - G|`: the labels are known, so a
candidate sentence's own forward/backward pass gives its exact contribution `G_b`; still
unsolved, that search runs again over the split's pools for the words it did not place (on those
two batches 3-4 of about 52 open tokens missing from them, against 13-15 from the row space's
best tokens). A batch left unsolved is peeled: a sentence whose `G_b`, taken off `G`, lowers its
rank by about its token count is exact (`verified_sentences`; a wrong token leaves the rank
where it was), so the verified ones are subtracted and the others solved again on what is left,
with fewer sentences to confuse (kept only where that lowers their residual).

Limits. Token type ids, lengths and special-token positions are taken as known structure.
- A word pair repeated at a pair of positions (two punctuation marks in two sentences) makes
  the inputs exactly dependent, so those rows' signals are not determined and go untested.
- A sentence longer than a head's width (32 in MiniLM) spans every signal in that head, so
  membership cannot place its tokens; the gradient-match search has to.
- The words met more than once are not placed by the split; the annealing takes each slot's
  first pool words as they come, so a wrong one there is fixed only by the coordinate search.
  A repeated word whose first token carries most of its share can pass as met once (3 of 47
  placed tokens on sentences 12-15): its other token then has no word left in the pools.
- The coordinate search can stop far from the truth (its final relative gradient residual
  is reported: about 1e-6 when exact). B = 1 needs no search. Peeling needs one sentence
  right to start from.
- Neither membership nor the gradient match repairs wrong pools by local moves (SST-2 dev
  sentences 8-11 and 12-15 as batches of four, query@0, before the split): a wrong row
  anywhere shifts every signal from `G = D^T H`, so two right short sentences next to two
  wrong long ones score 0.05-0.08, not 1e-12; coordinate descent on membership over every
  slot's zero-residual words, even from the truth with three tokens changed, ends with 17
  wrong; the gradient-match search over pools 60 tokens wider ends farther off (relative
  residual 0.80, against 0.37).
- Tried with the split and dropped: membership with the placed words' exact signals (their
  share times their LayerNorm scale) in place of fitted ones put 91 of 106 tokens of sentences
  12-15 wrong, against 6 without; searching every leftover word at every open slot without the
  first, narrower pass: 96 and 103 wrong, with and without the placed words protected.
- Why sentences 12-15 stay unsolved at query@0: the annealing's pools hold a wrong word among
  their first `n` at 15 tokens (12 with the split's ranking), and neither score guides a search
  towards the right ones. Annealing with replacements from the split's pools on membership
  (log scale) stayed at 0.13-0.3 with 71-86 of 98 content tokens wrong (3000 moves); the placed
  tokens' own backward signals (the split's share times the LayerNorm scale, exact whatever the
  other words are) differ from a hypothesis' by 0.05-2.5 (relative, squared) with one wrong
  token in the sentence and about 1-3 with two to twelve: right or not, no nearer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from gradaudit.capture.spectrum import Spectrum
from gradaudit.model.families import ModelLayout, layout

EXACT_COMPONENTS = ("query", "key", "value")
PARTNERS = {"query": "key", "key": "query"}
EXACT_RESIDUAL = 1e-4
MEMBERSHIP_EXACT = 1e-6
DEPENDENT = 1e-9  # singular value of the inputs, relative: an exact linear dependency
DEPENDENT_SHARE = 1e-3  # a row's weight in such a dependency that leaves its signal open
RESTARTS = 4
ANNEAL_STEPS = 50  # annealing moves per (shared slot, sentence)
TEMPERATURE = 0.03  # of the membership score (a sum of relative residuals), at the start
RUN = 8  # longest run of slots swapped between two sentences in one move
MAX_ORDERS = 24


@dataclass(frozen=True)
class Slot:
    """One column of the padded batch with its position/segment id and who occupies it."""

    column: int
    position: int
    segment: int
    sentences: tuple[int, ...]


def exact_applicable(lay: ModelLayout, module: str) -> bool:
    """True for layer-0 query/key/value of an absolute-position encoder."""
    where = lay.locate(module)
    absolute = getattr(lay.model.config, "position_embedding_type", "absolute") == "absolute"
    return absolute and where is not None and where[1] == 0 and where[0] in EXACT_COMPONENTS


def content_slots(
    batch: dict[str, torch.Tensor], content: torch.Tensor, lay: ModelLayout
) -> list[Slot]:
    """The slots holding text to recover, grouped by (column, position id, segment)."""
    positions = lay.position_ids(batch["attention_mask"])
    groups: dict[tuple[int, int, int], list[int]] = {}
    for b, column in content.nonzero().tolist():
        key = (column, int(positions[b, column]), int(batch["token_type_ids"][b, column]))
        groups.setdefault(key, []).append(b)
    return [Slot(c, p, s, tuple(bs)) for (c, p, s), bs in sorted(groups.items())]


def norm_affine(lay: ModelLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding LayerNorm's weight and bias (gamma, beta) in float64 on `device`."""
    norm = lay.embedding_norm
    return (
        norm.weight.detach().to(device, torch.float64),
        norm.bias.detach().to(device, torch.float64),
    )


def slot_offsets(lay: ModelLayout, slots: list[Slot], device: torch.device) -> torch.Tensor:
    """Position + segment embedding of each slot (float64, slots x width)."""
    pos = torch.tensor([s.position for s in slots], dtype=torch.long, device=device)
    seg = torch.tensor([s.segment for s in slots], dtype=torch.long, device=device)
    pos_table = lay.position_embeddings.weight.detach()
    seg_table = lay.token_type_embeddings.weight.detach()
    return (pos_table[pos] + seg_table[seg]).to(torch.float64)


def layer0_inputs(lay: ModelLayout, token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Exact float64 layer-0 inputs of `token_ids` (n) at slots with `offsets` (n x width)."""
    gamma, beta = norm_affine(lay, offsets.device)
    words = lay.word_embeddings.weight.detach()[token_ids].to(torch.float64)
    z = words + offsets
    z = z - z.mean(-1, keepdim=True)
    eps = lay.embedding_norm.eps
    return gamma * z / torch.sqrt(z.square().mean(-1, keepdim=True) + eps) + beta


def token_offsets(
    lay: ModelLayout, batch: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Position + segment embedding (float64) of the batch's tokens where `mask` is true."""
    positions = lay.position_ids(batch["attention_mask"])[mask].to(device)
    offsets = lay.position_embeddings.weight.detach()[positions]
    offsets = offsets + lay.token_type_embeddings.weight.detach()[batch["token_type_ids"][mask]]
    return offsets.to(torch.float64)


def known_inputs(
    lay: ModelLayout, batch: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Exact layer-0 inputs of the batch's tokens where `mask` is true (e.g. special tokens)."""
    offsets = token_offsets(lay, batch, mask, device)
    return layer0_inputs(lay, batch["input_ids"][mask].to(device), offsets)


def extend_basis(basis: torch.Tensor, inputs: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Orthonormal basis of span(basis) plus the `inputs` rows that lie outside it.

    A key gradient holds only differences of inputs (softmax ignores a shift shared by a
    sentence's keys, so each sentence's key signals sum to zero); adding the known [CLS]
    input restores the inputs' own span. Rows already inside (query, value) add nothing.
    """
    outside = inputs[residuals(inputs, basis) > tol]
    if not len(outside):
        return basis
    return torch.linalg.qr(torch.cat([basis, outside]).T).Q.T


def screen_tokens(
    lay: ModelLayout,
    basis: torch.Tensor,
    offsets: torch.Tensor,
    candidates: torch.Tensor,
    *,
    keep: int,
    chunk: int,
) -> torch.Tensor:
    """The `keep` candidates per slot with the smallest residual (slots x keep token ids).

    Inner products only: for x = gamma*z/sigma + beta and a basis W,
    |Wx|^2 = |W(gamma z)|^2/sigma^2 + 2 W(gamma z).W beta/sigma + |W beta|^2, each term a
    matmul between a vocabulary chunk and the slots. The smaller of the row basis and its
    complement is used.
    """
    device = basis.device
    width = basis.shape[1]
    gamma, beta = norm_affine(lay, device)
    eps = lay.embedding_norm.eps
    use_complement = basis.shape[0] > width // 2
    if use_complement:
        w = torch.linalg.svd(basis, full_matrices=True).Vh[basis.shape[0] :]
    else:
        w = basis
    w_g = w * gamma  # W diag(gamma)
    off = offsets - offsets.mean(-1, keepdim=True)  # slots x d, centred
    b = off @ w_g.T  # slots x k
    c = w @ beta  # k
    off_sq = off.square().sum(-1)
    off_gsq = (gamma * off).square().sum(-1)
    off_gb = off @ (gamma * beta)
    b_sq = b.square().sum(-1)
    b_c = b @ c
    table = lay.word_embeddings.weight.detach()
    best_res = torch.zeros((len(offsets), 0), dtype=torch.float64, device=device)
    best_ids = torch.zeros((len(offsets), 0), dtype=torch.long, device=device)
    for start in range(0, len(candidates), chunk):
        ids = candidates[start : start + chunk].to(device)
        e = table[ids].to(torch.float64)
        e = e - e.mean(-1, keepdim=True)
        a = e @ w_g.T  # chunk x k
        z_sq = e.square().sum(-1, keepdim=True) + 2 * e @ off.T + off_sq  # chunk x slots
        sigma = torch.sqrt(z_sq / width + eps)
        gz_sq = (gamma * e).square().sum(-1, keepdim=True) + 2 * (gamma.square() * e) @ off.T
        gz_sq = gz_sq + off_gsq
        gzb = (e @ (gamma * beta)).unsqueeze(-1) + off_gb
        x_sq = gz_sq / sigma.square() + 2 * gzb / sigma + beta.square().sum()
        wz_sq = a.square().sum(-1, keepdim=True) + 2 * a @ b.T + b_sq
        wzc = (a @ c).unsqueeze(-1) + b_c
        wx_sq = wz_sq / sigma.square() + 2 * wzc / sigma + c.square().sum()
        res = wx_sq if use_complement else x_sq - wx_sq
        res = (res.clamp_min(0) / x_sq).T  # slots x chunk
        best_res = torch.cat([best_res, res], 1)
        best_ids = torch.cat([best_ids, ids.expand(len(offsets), -1)], 1)
        top = best_res.topk(min(keep, best_res.shape[1]), dim=1, largest=False)
        best_res, best_ids = top.values, best_ids.gather(1, top.indices)
    return best_ids


def residuals(inputs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Normalised residual of each row of `inputs` (..., width) against the row space."""
    projected = (inputs @ basis.T) @ basis
    return (inputs - projected).norm(dim=-1) / inputs.norm(dim=-1)


def pick_by_gap(res: torch.Tensor, count: int) -> int:
    """How many of the sorted residuals `res` are true: 1..count, at the largest jump."""
    if count <= 1 or res.numel() <= 1:
        return 1
    logs = res.clamp_min(1e-300).log()
    jumps = logs[1 : count + 1] - logs[:count]
    return int(jumps.argmax()) + 1


def verified_sentences(
    grads: torch.Tensor, target: torch.Tensor, spec: Spectrum, content: torch.Tensor
) -> list[int]:
    """Sentences whose hypothesised gradient is exact: taken off the batch's gradient, it
    lowers the rank by at least half the sentence's content tokens.

    `grads` (n x out x in) are the sentences' gradients, `spec` the spectrum of `target`.
    The truth removes the rows only its sentence holds, so the rank drops by about its token
    count (10 of 11, 6 of 6, 12 of 13 on an SST-2 batch of four at MiniLM's query@0); one
    wrong token changes every token's backward signal, the difference fills the span again,
    and the rank does not drop (0 there). Values count as gone below the geometric mean of the
    target's last kept and first dropped singular values.
    """
    values, rank = spec.singular_values.to(torch.float64), spec.rank
    last = values[rank - 1]
    cut = (last * values[rank]).sqrt() if rank < len(values) else last * DEPENDENT
    cut = cut.to(target.device)
    left = torch.stack([(torch.linalg.svdvals((target - g).double()) > cut).sum() for g in grads])
    needed = (content.sum(1) / 2).clamp_min(1)
    return (rank - left >= needed).nonzero().flatten().tolist()


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
class Signals:
    """One hypothesis' distinct inputs, their backward signals and which rows each sentence holds.

    `rows[b]` indexes sentence `b`'s tokens into the distinct inputs; `tested` marks the rows
    whose signal belongs to one sentence and is determined by the gradient (not shared by two
    sentences, and not on an exact linear dependency among the inputs, where `G = D^T H`
    leaves the split of the signal open).
    """

    signals: torch.Tensor  # heads x distinct x head width
    partners: torch.Tensor  # heads x distinct x head width
    rows: list[list[int]]
    # Plain lists, per distinct input: the annealing reads them one row at a time, hundreds of
    # thousands of times per batch.
    shared: list[bool]  # held by more than one sentence
    dependent: list[bool]
    tested: list[bool] = field(init=False)  # one sentence's, and fixed by the gradient

    def __post_init__(self) -> None:
        self.tested = [not s and not d for s, d in zip(self.shared, self.dependent)]


@dataclass
class Membership:
    """Which sentence a token belongs to, from layer-0 attention (query and key modules).

    Given a hypothesis (token ids), its distinct inputs `H` give each one's backward signal
    `D` from `G = D^T H` (least squares). Per head, a query signal is a zero-sum combination
    of its own sentence's keys, so it lies in the span of the sentence's key differences; a
    key signal is a combination of its own sentence's queries. A sentence's score is the
    relative residual of its tested signals against those spans: about 1e-9 for the truth,
    1e-3 and up for a swapped token, even where the row space of `G` cannot tell the two apart
    (every true word at every true position is in it). A sentence longer than the head width
    spans every signal, so it scores 0 whatever it holds.
    """

    lay: ModelLayout
    component: str
    weight: torch.Tensor
    bias: torch.Tensor
    heads: int
    target: torch.Tensor
    batch: dict[str, torch.Tensor]

    @classmethod
    def build(
        cls,
        model: nn.Module,
        module: nn.Module,
        batch: dict[str, torch.Tensor],
        target: torch.Tensor,
    ) -> Membership | None:
        """The test for `module` when it is a layer's query or key projection, else None."""
        lay = layout(model)
        name = next(n for n, m in model.named_modules() if m is module)
        where = lay.locate(name)
        if where is None or where[0] not in PARTNERS:
            return None
        partner = model.get_submodule(lay.component_name(PARTNERS[where[0]], where[1]))
        weight = partner.weight.detach().to(target.device, torch.float64)
        bias = partner.bias.detach() if partner.bias is not None else weight.new_zeros(1)
        heads = int(model.config.num_attention_heads)
        return cls(lay, where[0], weight, bias.to(weight), heads, target.double(), batch)

    def signals(self, ids: torch.Tensor) -> Signals:
        """Distinct inputs of the hypothesis `ids` (batch x length) and their signals."""
        mask = self.batch["attention_mask"].bool()
        positions = self.lay.position_ids(self.batch["attention_mask"])[mask]
        segments = self.batch["token_type_ids"][mask]
        tokens = ids[mask]
        code = (tokens * (positions.max() + 1) + positions) * (segments.max() + 1) + segments
        unique, inverse = torch.unique(code, return_inverse=True)
        first = torch.zeros(len(unique), dtype=torch.long, device=ids.device)
        first.scatter_(0, inverse, torch.arange(len(code), device=ids.device))
        offsets = self.lay.position_embeddings.weight.detach()[positions[first]]
        offsets = offsets + self.lay.token_type_embeddings.weight.detach()[segments[first]]
        inputs = layer0_inputs(self.lay, tokens[first], offsets.to(torch.float64))
        signals = torch.linalg.lstsq(inputs.T, self.target.T, driver="gelsd").solution
        # Rows on an exact dependency (a word pair repeated at a pair of positions, e.g. two
        # punctuation marks) get an arbitrary share of the signal: leave them untested.
        left, sv, _ = torch.linalg.svd(inputs, full_matrices=True)
        dependent = left[:, int((sv > sv[0] * DEPENDENT).sum()) :].norm(dim=1) > DEPENDENT_SHARE
        shared = torch.bincount(inverse, minlength=len(unique)) > 1
        partners = inputs @ self.weight.T + (self.bias if self.component == "key" else 0)
        split = lambda m: m.reshape(len(m), self.heads, -1).transpose(0, 1)  # noqa: E731
        rows = [r.tolist() for r in inverse.split(mask.sum(1).tolist())]
        return Signals(split(signals), split(partners), rows, shared.tolist(), dependent.tolist())

    def span(self, state: Signals, rows: list[int]) -> torch.Tensor:
        """Orthonormal per-head basis (heads x head width x k) of one sentence's partners."""
        vectors = state.partners[:, rows]
        if self.component == "query":  # softmax ignores a shared shift: key differences
            vectors = vectors[:, 1:] - vectors[:, :1]
        return torch.linalg.qr(vectors.transpose(1, 2)).Q

    def residual(self, state: Signals, members: list[int], span: torch.Tensor) -> float:
        """Relative residual of the `members`' signals against `span`."""
        if not members:
            return 0.0
        sig = state.signals[:, members]
        res = sig - (sig @ span) @ span.transpose(1, 2)
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
                union = torch.linalg.qr(torch.cat([spans[b] for b in bs], -1)).Q
                total += self.residual(state, [i], union)
        return total

    def score(self, state: Signals) -> tuple[list[float], list[torch.Tensor], float]:
        """Each sentence's score and span, and the shared rows' score; all ~0 when right."""
        spans = [self.span(state, rows) for rows in state.rows]
        own = [
            self.residual(state, [i for i in rows if state.tested[i]], span)
            for rows, span in zip(state.rows, spans)
        ]
        return own, spans, self.shared_score(state, state.rows, spans)


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
            tested = [i for i in rows[x] if state.tested[i]]
            trial_own[x] = membership.residual(state, tested, trial_spans[x])
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
