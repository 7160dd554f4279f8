"""The `span` attack: the row space of a linear module's weight gradient spans its inputs.

`G = sum_t delta_t x_t^T` has rank at most the number of tokens; below the input width its
row space is a label-free, backward-free constraint on what the inputs were.

- exact mode (`span_exact`): layer-0 query/key/value of an absolute-position encoder, whose
  input is a per-token function of (token, position, segment): every vocabulary token is
  tested at every slot, then sentences are sorted out by the gradient match;
- deep mode (`span_deep`): any other linear module with a usable span; candidate inputs from
  the model's own forward pass must span the observed row space and lie in it (a search over
  continuous embeddings, then tokens). The result's gradient-matching cosine and its span
  residual (0 for the truth) are in `info`.

What cannot leak is said in `info`: a rank-limited gradient (e.g. the last layer of a sequence
classifier, where only [CLS] reaches the head) or a saturated one (rank = width) is reported,
not attacked; with `saturated="gradmatch"` a saturated snapshot falls back to gradmatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import Attack, Reconstruction, candidate_token_ids, content_mask, decode
from gradaudit.attacks.gradmatch import GradientMatcher, GradMatchOptions
from gradaudit.attacks.span.deep import DeepSettings, SpanObjective, deep_search
from gradaudit.attacks.span.exact import (
    EXACT_RESIDUAL,
    Search,
    content_slots,
    exact_applicable,
    extend_basis,
    known_inputs,
    layer0_inputs,
    pick_by_gap,
    residuals,
    screen_tokens,
    slot_offsets,
    token_offsets,
    verified_sentences,
)
from gradaudit.attacks.span.words import word_places
from gradaudit.capture.snapshot import GradientSnapshot
from gradaudit.capture.spectrum import Spectrum, label, spectrum
from gradaudit.errors import GradAuditError
from gradaudit.model.families import layout

SATURATED_CHOICES = ("stop", "gradmatch")
ROUGH_CHOICES = ("auto", "none", "bfloat16", "float16")


def rough_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The dtype of deep mode's rough objective for option `choice` on `device`, or None."""
    if choice != "auto":
        return None if choice == "none" else getattr(torch, choice)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Without native support (no AVX-512-BF16 or AMX) bfloat16 is emulated and slower.
    cpu = torch.cpu
    native = getattr(cpu, "_is_avx512_bf16_supported", None) or getattr(
        cpu, "_is_amx_tile_supported", None
    )
    return torch.bfloat16 if device.type == "cpu" and native is not None and native() else None


@dataclass
class SpanOptions:
    """Numbers the span attack uses (see the span_exact module docstring)."""

    chunk: int = 4096
    min_gap: float = 50.0
    pool_extra: int = 1
    sweeps: int = 3
    forward_batch: int = 32
    deep_steps: int = 300  # Adam steps per restart at budget 1
    deep_restarts: int = 4  # continuous starts; the best 2 are searched while unsolved
    deep_lr: float = 0.05  # first start's step, x the embeddings' spread; the last one's is 4x
    deep_neighbours: int = 64  # nearest tokens each position tries
    deep_bag: int = 8  # nearest tokens of each position that every position also tries
    deep_linearised: int = 32  # tokens per position ranked by the score's gradient, each sweep
    deep_screen: int = 32  # of the nearest and bag tokens, tried per position (0: all)
    deep_inserts: int = 16  # tokens tried as an insertion that shifts its sentence
    deep_sweeps: int = 20  # coordinate-descent sweeps at budget 1
    deep_moves: int = 1024  # reorderings (swaps, moves of a token) tried per sweep
    # Deep mode ranks candidates with a copy of the model in this dtype and scores only the
    # best few at full precision: "auto" is bfloat16 where the device computes it natively
    # (about twice float32's speed on an AVX-512-BF16 CPU), "none" scores all at full precision.
    rough_dtype: str = "auto"
    gradient_check: bool = True
    saturated: str = "stop"
    progress: bool = False


def module_spectra(
    model: nn.Module, snapshot: GradientSnapshot, min_gap: float, device: torch.device
) -> dict[str, Spectrum]:
    """Spectrum of every observed module (NaN/inf raise, naming the module)."""
    noisy = snapshot.kind == "noised"
    return {
        m: spectrum(snapshot.weight_gradient(m).to(device), noisy=noisy, min_gap=min_gap, name=m)
        for m in snapshot.modules
    }


class SpanAttack(Attack):
    """Recover tokens from the row space of linear-module weight gradients."""

    name = "span"
    Options = SpanOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.saturated not in SATURATED_CHOICES:
            raise GradAuditError(
                f"saturated={self.options.saturated!r}: choose one of "
                f"{', '.join(SATURATED_CHOICES)}"
            )
        counts = ("chunk", "forward_batch", "deep_restarts", "deep_neighbours", "deep_sweeps")
        for name in counts:
            if getattr(self.options, name) < 1:
                raise GradAuditError(f"{name} must be at least 1")
        sizes = ("deep_steps", "deep_bag", "deep_linearised", "deep_screen", "deep_inserts")
        for name in (*sizes, "deep_moves"):
            if getattr(self.options, name) < 0:
                raise GradAuditError(f"{name} must be at least 0")
        if self.options.rough_dtype not in ROUGH_CHOICES:
            choices = ", ".join(ROUGH_CHOICES)
            raise GradAuditError(
                f"rough_dtype={self.options.rough_dtype!r}: choose one of {choices}"
            )

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
        lay = layout(model)
        spectra = module_spectra(model, snapshot, opts.min_gap, device)
        tokens = int(snapshot.batch["attention_mask"].sum())
        info: dict[str, Any] = {
            "spectra": {m: s.summary() for m, s in spectra.items()},
            "tokens": tokens,
        }
        content = content_mask(snapshot, tokenizer)
        ids = snapshot.batch["input_ids"].clone()
        ids[content] = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
        labels = {m: label(s, tokens, exact_applicable(lay, m)) for m, s in spectra.items()}
        info["labels"] = labels
        usable = {m: spectra[m] for m, lab in labels.items() if lab in ("exact", "span")}
        why = self._unusable_reason(labels)
        if not usable:
            if why.startswith("saturated") and opts.saturated == "gradmatch":
                from gradaudit.attacks import get_attack

                result = get_attack("gradmatch").reconstruct(
                    model, snapshot, tokenizer=tokenizer, seed=seed, device=device, budget=budget
                )
                result.info.update(info, mode="gradmatch", why=why)
                return result
            info.update(mode="none", why=why)
            return self._result(tokenizer, snapshot, ids, info)
        exact = [m for m in usable if labels[m] == "exact"]
        if exact:
            module = min(exact, key=lambda m: usable[m].rank)
            ids, details = self._exact(model, snapshot, lay, module, usable[module], tokenizer, ids)
            info.update(mode="exact", module=module, **details)
            info["why"] = f"{module} takes a per-token input (layer 0) and its gradient has rank "
            info["why"] += f"{usable[module].rank} < width {usable[module].width}"
        else:
            ids, details = self._deep(model, snapshot, lay, usable, tokenizer, seed, budget)
            info.update(mode="deep", modules=sorted(usable), **details)
            info["why"] = f"{', '.join(sorted(usable))}: rank below the width past layer 0"
        return self._result(tokenizer, snapshot, ids, info)

    @staticmethod
    def _unusable_reason(labels: dict[str, str]) -> str:
        if set(labels.values()) == {"zero"}:
            return "all-zero gradient: nothing to recover (the batch contributed no gradient)"
        if set(labels.values()) <= {"saturated", "zero"}:
            return "saturated: the gradient has full rank, so its span constrains nothing"
        limited = [m for m, lab in labels.items() if lab == "rank-limited"]
        if limited:
            return (
                f"rank-limited: {', '.join(limited)} have rank far below the tokens (at "
                "the last layer of a sequence classifier only [CLS] reaches the head), so they "
                "cannot leak the other tokens"
            )
        return ""

    def _result(
        self,
        tokenizer: PreTrainedTokenizerBase,
        snapshot: GradientSnapshot,
        ids: torch.Tensor,
        info: dict[str, Any],
    ) -> Reconstruction:
        lengths = snapshot.batch["attention_mask"].sum(1).tolist()
        token_ids = [ids[b, : int(n)].tolist() for b, n in enumerate(lengths)]
        return Reconstruction(
            token_ids=token_ids,
            texts=decode(tokenizer, token_ids),
            attack="span",
            options=self.options_dict(),
            info=info,
        )

    def _exact(
        self,
        model: nn.Module,
        snapshot: GradientSnapshot,
        lay: Any,
        module: str,
        spec: Spectrum,
        tokenizer: PreTrainedTokenizerBase,
        ids: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Exact mode. At B > 1, while the batch is not solved, the sentences that the rank
        drop verifies (`verified_sentences`) are taken off the gradient and the others are
        solved again: fewer sentences, fewer ambiguous (word, position) pairs; one left is a
        single sentence, which the row space alone decides."""
        opts = self.options
        device = spec.basis.device
        batch = {k: v.to(device) for k, v in snapshot.batch.items()}
        content = content_mask(snapshot, tokenizer).to(device)
        full = snapshot.weight_gradient(module).to(device)
        target, ids, left = full, ids.to(device), list(range(len(ids)))
        details: dict[str, Any] = {"peeled": []}
        before = math.inf  # relative residual of the current ids of `left` on their remainder
        while True:
            scale = len(ids) / len(left)  # the part's gradient as if it were the whole batch
            part = {k: v[left] for k, v in batch.items()}
            if len(left) < len(ids):
                noisy = snapshot.kind == "noised"
                spec = spectrum(target * scale, noisy=noisy, min_gap=opts.min_gap, name=module)
                if spec.status != "ok":
                    break
            search = Search(
                model, model.get_submodule(module), part, target * scale, opts.forward_batch
            )
            found, residual, screening = self._solve_exact(
                lay, search, spec, content[left], tokenizer, ids[left]
            )
            if residual >= before:  # solving again did worse than the ids it started from
                details["gradient_residual"] = before * float(target.norm() / full.norm())
                break
            ids[left] = found
            if len(left) == len(ids):  # the whole batch's screening is the one reported
                details.update(screening)
            # What the batch's gradient leaves unexplained: the part's relative residual,
            # back at the whole batch's scale (the peeled gradients were taken off as computed).
            details["gradient_residual"] = residual * float(target.norm() / full.norm())
            if residual < EXACT_RESIDUAL or len(left) == 1:
                break
            grads = search.gradients(list(range(len(left))), found)
            verified = verified_sentences(grads, search.target, spec, content[left])
            if not verified or len(verified) == len(left):  # all verified: nothing to redo
                break
            details["peeled"].append([left[i] for i in verified])
            remainder = search.target - grads[verified].sum(0)
            others = [i for i in range(len(left)) if i not in verified]
            before = float((remainder - grads[others].sum(0)).norm() / remainder.norm())
            target = target - grads[verified].sum(0) / scale
            left = [b for i, b in enumerate(left) if i not in verified]
        return ids.cpu(), details

    def _solve_exact(
        self,
        lay: Any,
        search: Search,
        spec: Spectrum,
        content: torch.Tensor,
        tokenizer: PreTrainedTokenizerBase,
        ids: torch.Tensor,
    ) -> tuple[torch.Tensor, float, dict[str, Any]]:
        """Screen every slot of `search`'s batch against the span, then sort the tokens out
        (`Search.run`); the ids, their relative gradient residual and the slots' margins.

        With several sentences the gradient is also split into word and slot parts
        (`span_words`): the words it places come first in their slots' pools and leave every
        other pool; a batch the search leaves unsolved is searched again over the split's
        pools for the words it did not place."""
        opts = self.options
        device = spec.basis.device
        batch = search.batch
        ids = ids.clone()
        special = batch["attention_mask"].bool() & ~content
        basis = extend_basis(spec.basis, known_inputs(lay, batch, special, device))
        slots = content_slots(batch, content, lay)
        offsets = slot_offsets(lay, slots, device)
        candidates = candidate_token_ids(tokenizer)
        places = None
        if any(len(s.sentences) > 1 for s in slots):
            special_offsets = token_offsets(lay, batch, special, device)
            places = word_places(
                lay, search.target, basis, slots, batch["input_ids"][special], special_offsets,
                offsets, candidates, chunk=opts.chunk,
            )  # fmt: skip
        sure = places.placed if places is not None else [[] for _ in slots]
        placed = {v for words in sure for v in words}
        keep = max(len(s.sentences) for s in slots) + opts.pool_extra
        screened = screen_tokens(lay, basis, offsets, candidates, keep=keep, chunk=opts.chunk)
        pools, slot_res = [], []
        for j, slot in enumerate(tqdm(slots, desc="span slots", disable=not opts.progress)):
            inputs = layer0_inputs(lay, screened[j], offsets[j].expand(len(screened[j]), -1))
            res, order = residuals(inputs, basis).sort()
            pool = screened[j][order]
            k = pick_by_gap(res, len(slot.sentences))
            slot_res.append((float(res[k - 1]), float(res[k]) if len(res) > k else float("inf")))
            if places is not None:
                # Never an empty pool: the split's ranking, else the row space's own.
                screened_ids = pool.tolist()
                rest = [v for v in screened_ids if v not in placed] or places.ranked[j]
                pool = torch.tensor(sure[j] + (rest or screened_ids), device=device)
                k = min(len(pool), len(slot.sentences))
            pools.append(pool)
            for i, b in enumerate(slot.sentences):
                ids[b, slot.column] = pool[min(i, k - 1)]
        details: dict[str, Any] = {
            "slot_residual_max": max(r for r, _ in slot_res),
            "slot_margin_min": min(nxt / max(r, 1e-300) for r, nxt in slot_res),
            "searched_slots": sum(len(p) > 1 for p in pools),
        }
        kept = [len(words) for words in sure]
        found, residual = search.run(ids, slots, pools, opts.sweeps, kept)
        if places is not None:
            details.update(words=len(places.words), placed_by_split=sum(map(len, sure)))
            if residual >= EXACT_RESIDUAL:
                found, residual = search.descend(
                    found, slots, places.pools(device), opts.sweeps, kept
                )
        return found, residual, details

    def _deep(
        self,
        model: nn.Module,
        snapshot: GradientSnapshot,
        lay: Any,
        usable: dict[str, Spectrum],
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        budget: float,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        opts = self.options
        device = next(iter(usable.values())).basis.device
        content = content_mask(snapshot, tokenizer)
        bases = {m: s.basis for m, s in usable.items()}
        rough = rough_dtype(opts.rough_dtype, device)
        objective = SpanObjective(model, lay, snapshot, bases, content, device, rough)
        settings = DeepSettings(
            steps=round(opts.deep_steps * budget),
            restarts=opts.deep_restarts,
            lr=opts.deep_lr,
            neighbours=opts.deep_neighbours,
            bag=opts.deep_bag,
            linearised=opts.deep_linearised,
            screen=opts.deep_screen,
            inserts=opts.deep_inserts,
            sweeps=max(1, round(opts.deep_sweeps * budget)),
            moves=opts.deep_moves,
            forward_batch=opts.forward_batch,
        )
        ids, details = deep_search(objective, candidate_token_ids(tokenizer), settings, seed)
        details["rough_dtype"] = str(rough).removeprefix("torch.") if rough else "none"
        if opts.gradient_check:
            matcher = GradientMatcher(
                model, snapshot, tokenizer, device, GradMatchOptions(reg_weight=0)
            )
            distance = matcher.losses(objective.embed(ids).unsqueeze(0))[0]
            details["gradient_cosine"] = 1 - float(distance.detach())
        return ids.cpu(), details
