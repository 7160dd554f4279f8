"""Where a model's embedding dropout sits, and each slot's dropped-out inputs found in the span.

The robust test (`masks`) assumes BERT's order: dropout right after the embedding LayerNorm, so
a layer-0 input is `m * u / (1 - p)`. `embedding_dropout` checks that order on the model itself
(one embedding pass in training mode) and says why when it does not hold; `find_rows` finds,
slot by slot, the (token, mask) pairs whose inputs lie in the span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradaudit.attacks.span.exact.masks import (
    MASK_EXACT,
    MaskFit,
    anchor_outliers,
    best_fit,
    box_masks,
    decode_masks,
    descend_masks,
)
from gradaudit.attacks.span.exact.screening import layer0_inputs
from gradaudit.model.families import ModelLayout

RESTART_DRAWS = 32  # random starting masks per mask sought (a true token's end in 16-50 %)
RESTART_DROP = 0.3  # share of coordinates a random starting mask drops
RETRIED = 12  # candidates past the missing count restarted, by each of two orders
RESTART_ROUNDS = 2  # rounds of restarts, draws doubled each round
DISTINCT = 1e-2  # relative difference of two masked inputs of one token that are two rows
OTHER_PRICE = 4.0  # a found mask's dropped coordinates, priced in the search for another


def embedding_dropout(lay: ModelLayout) -> tuple[float, str]:
    """The embedding dropout rate from the config and why the robust test cannot model it
    ("" when it can): one training-mode pass of the embeddings must give, per coordinate,
    either 0 or LayerNorm's output / (1 - p)."""
    rate = getattr(lay.model.config, "hidden_dropout_prob", None)
    if not lay.bert_embeddings or lay.family.embedding_norm is None:
        return float(rate or 0.0), f"the {lay.family.name} family has no embedding LayerNorm"
    if rate is None:
        return 0.0, "the config names no hidden_dropout_prob"
    if rate <= 0:
        return 0.0, ""
    embeddings = lay.submodule(lay.family.embedding_norm.rsplit(".", 1)[0])
    device = lay.word_embeddings.weight.device
    ids = torch.arange(1, 9, device=device)[None]
    devices = [device] if device.type == "cuda" else []
    mode = embeddings.training
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            embeddings.train()
            out = embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))[0]
    except TypeError as error:
        return float(rate), f"its embeddings cannot be run alone ({error})"
    finally:
        embeddings.train(mode)
    pos = lay.position_ids(torch.ones_like(ids))[0]
    offsets = lay.position_embeddings.weight.detach()[pos] + lay.token_type_embeddings.weight[0]
    u = layer0_inputs(lay, ids[0], offsets.detach().double()) / (1 - rate)
    out = out.double()
    fits = ((out - u).abs() <= 1e-4 * u.abs().clamp_min(1e-3)) | (out == 0)
    if not bool(fits.all()) or not bool((out == 0).any()):
        return float(rate), (
            "its embedding output is not LayerNorm's output with coordinates dropped (dropout "
            "elsewhere, e.g. before the LayerNorm)"
        )
    return float(rate), ""


@dataclass
class FoundRows:
    """The inputs found in the span: token, slot index and exact input row of each; for a key
    module also the mask of its sentence's first token (which sentence it is in)."""

    tokens: list[int]
    slots: list[int]
    inputs: list[torch.Tensor]
    anchors: list[torch.Tensor]

    def stack(self) -> torch.Tensor:
        return torch.stack(self.inputs) if self.inputs else torch.zeros(0)

    def add(self, token: int, slot: int, row: torch.Tensor, anchor: torch.Tensor | None) -> None:
        """One more found input: its token, slot, row and (key modules) first-token mask."""
        self.tokens.append(token)
        self.slots.append(slot)
        self.inputs.append(row)
        self.anchors.append(anchor)


Masks = tuple[torch.Tensor, torch.Tensor | None]  # a row's mask, its anchor's (key modules)


@dataclass
class Finder:
    """The dropout-robust tests against one row space: `anchor` (key modules) is the unmasked
    first-token input whose masked copy each row differs from by a vector of the span."""

    basis: torch.Tensor
    most: int
    anchor: torch.Tensor | None
    paired_box: bool = False  # key: also the box relaxation over row and anchor masks

    def rank(self, inputs: torch.Tensor) -> MaskFit:
        """Masks for many rows at once, then the one-coordinate descent: for query and value
        from the box relaxation (its ADMM in float32: it is only rounded), for key from
        sparse-error decoding against the span and the anchor. SST-2 dev 8-15, query@0,
        B = 8 (rank 234): 208 of 219 true (slot, token) pairs exact from the box, 152 from
        the decoding, no false one from either. Key: once per guess of which of the anchor's
        outlier coordinates were dropped (`anchor_outliers`), and with `paired_box` from the
        box relaxation over both masks too (slow: for wide spans), the best kept per row."""
        if self.anchor is None:
            rough = box_masks(inputs.float(), self.basis.float(), self.most)
            fit = MaskFit(rough.residual.to(inputs.dtype), rough.kept)
            return descend_masks(fit, inputs, self.basis, self.most)
        fits = [
            decode_masks(inputs, self.basis, self.most, self.anchor, dropped)
            for dropped in anchor_outliers(self.anchor)
        ]
        if self.paired_box:  # float32, as for query and value: it is only rounded
            basis, anchor = self.basis.float(), self.anchor.float()
            fits.append(box_masks(inputs.float(), basis, self.most, anchor))
        return best_fit(
            [descend_masks(f, inputs, self.basis, self.most, self.anchor) for f in fits]
        )

    def restart(self, rows: torch.Tensor, draws: list[int], seed: int) -> MaskFit:
        """The descent from `draws[i]` random starting masks of each of `rows`, one batch
        (query and value): finds the masks a first fit missed, and the other masks of a token
        several sentences hold at one slot (every [CLS]), each the end of some starts."""
        rows = rows.repeat_interleave(torch.tensor(draws, device=rows.device), dim=0)
        generator = torch.Generator().manual_seed(seed)
        start = torch.rand(rows.shape, generator=generator, dtype=rows.dtype) >= RESTART_DROP
        fit = MaskFit(torch.zeros(len(rows)), start.to(rows.device))
        return descend_masks(fit, rows, self.basis, self.most)


def same_input(row: torch.Tensor, a: Masks, b: Masks) -> bool:
    """Whether two masks of `row` give one input: masks may differ where `row` is near 0."""
    return bool(((a[0].to(row.dtype) - b[0].to(row.dtype)) * row).norm() <= DISTINCT * row.norm())


def find_rows(
    lay: ModelLayout,
    finder: Finder,
    offsets: torch.Tensor,
    candidates: list[torch.Tensor],
    counts: list[int],
    rate: float,
    restart: bool = True,
) -> FoundRows:
    """Per slot `j` (position + segment embedding `offsets[j]`), up to `counts[j]` inputs
    `m * u / (1 - p)` in the span among its `candidates[j]` tokens: ranked together
    (`Finder.rank`), then, while a slot lacks inputs and `restart`, restarts (`more_masks`;
    a key module's slots are searched again per sentence, with each sentence's first-token
    mask known)."""
    sizes = [len(c) for c in candidates]
    slot_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    inputs = layer0_inputs(lay, torch.cat(candidates).to(offsets.device), offsets[slot_of])
    inputs = inputs / (1 - rate)
    fit = finder.rank(inputs)
    found = FoundRows([], [], [], [])
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    for j, size in enumerate(sizes):
        part = slice(starts[j], starts[j] + size)
        res, rows = fit.residual[part], inputs[part]
        anchors = fit.anchor_kept[part] if fit.anchor_kept is not None else [None] * size
        chosen = {
            i: [(fit.kept[part][i], anchors[i])]
            for i in res.argsort().tolist()
            if res[i] < MASK_EXACT
        }
        if len(chosen) < counts[j] and restart and finder.anchor is None:  # key: sentence_pass
            more_masks(finder, rows, res, chosen, counts[j])
            other_masks(finder, rows, chosen, counts[j])
        picked = [(i, m) for i in chosen for m in chosen[i]][: counts[j]]
        for i, (kept, anchor) in picked:
            found.add(int(candidates[j][i]), j, rows[i] * kept, anchor)
    return found


def other_masks(
    finder: Finder, rows: torch.Tensor, chosen: dict[int, list[Masks]], count: int
) -> None:
    """Add to `chosen` other masks of the tokens found, while the slot lacks inputs (query and
    value): the box relaxation with the coordinates their masks found dropped priced
    `OTHER_PRICE` times the rest (a second mask drops mostly others), then the descent,
    repeated while it finds a new exact mask. Random restarts end on the mask found; on
    SST-2 dev 8-15 (B = 8, seed 1) this found 2 of the 4 missing other masks of a token
    found (a "'" and a [SEP]; not the second [SEP] nor "of")."""
    for i in list(chosen):
        while sum(map(len, chosen.values())) < count:
            cost = torch.ones_like(rows[i])
            for kept, _ in chosen[i]:
                cost = torch.where(kept, cost, OTHER_PRICE)
            box = box_masks(rows[i][None].float(), finder.basis.float(), finder.most,
                            cost=cost[None].float())  # fmt: skip
            fit = MaskFit(box.residual.to(rows.dtype), box.kept)
            fit = descend_masks(fit, rows[i][None], finder.basis, finder.most)
            new = (fit.kept[0], None)
            if fit.residual[0] >= MASK_EXACT or any(same_input(rows[i], new, m) for m in chosen[i]):
                break
            chosen[i].append(new)


def more_masks(
    finder: Finder,
    rows: torch.Tensor,
    residual: torch.Tensor,
    chosen: dict[int, list[Masks]],
    count: int,
) -> None:
    """Add to `chosen` (candidate index -> its masks) the masks that random restarts find, until
    the slot holds `count`: of the tokens found (another sentence holding one) and of the best
    candidates by the fit and by the prefilter's order (a stuck true token ranked 48th by its
    fit, 1st by the prefilter)."""
    lacking = count - sum(map(len, chosen.values()))
    for attempt in range(RESTART_ROUNDS):
        by_fit = [i for i in residual.argsort().tolist() if i not in chosen]
        by_prefilter = [i for i in range(len(rows)) if i not in chosen]
        more = lacking + RETRIED
        tried = list(dict.fromkeys([*chosen, *by_fit[:more], *by_prefilter[:more]]))
        draws = [RESTART_DRAWS * (lacking + len(chosen.get(i, []))) << attempt for i in tried]
        fit = finder.restart(rows[tried], draws, seed=attempt)
        exact = (fit.residual < MASK_EXACT).tolist()
        ends = torch.tensor(draws).cumsum(0).tolist()
        for i, end, n in zip(tried, ends, draws):
            for k in (k for k in range(end - n, end) if exact[k] and lacking > 0):
                new = (fit.kept[k], None)
                if not any(same_input(rows[i], new, m) for m in chosen.get(i, [])):
                    chosen.setdefault(i, []).append(new)
                    lacking -= 1
        if lacking <= 0:
            return
