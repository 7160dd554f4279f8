"""The `causal` attack: exact recovery of a decoder's batch from one linear module's gradient.

In a decoder the input of a per-token module at position t depends on tokens <= t only, so the
sentences are grown position by position (`grow`): the next token of a prefix is one whose
module input, computed after the prefix's key/value cache, lies in the gradient's row space.
The last token of a causal LM has no row in any module's gradient (it predicts nothing); it is
the label of the position before it, so the gradient match recovers it (`last`).

Threat model. The adversary knows the model's weights, the tokenizer, and each sentence's
length (the attention mask); it does not know the text. For a causal LM the labels ARE the
text (the input ids, shifted by one), so this attack never reads the snapshot's `input_ids` or
`labels`: only `attention_mask`. The loss it models is the standard shifted next-token loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import (
    Attack,
    Reconstruction,
    candidate_token_ids,
    decode,
    special_ids,
)
from gradaudit.attacks.causal.first import FirstPosition
from gradaudit.attacks.causal.grow import Grower
from gradaudit.attacks.causal.guess import NextTokenGuess
from gradaudit.attacks.causal.last import LastTokens
from gradaudit.attacks.causal.options import CausalOptions
from gradaudit.attacks.causal.order import Orderer, position_free
from gradaudit.attacks.causal.pairs import stand_in_tokens
from gradaudit.attacks.causal.prefix import PrefixRunner
from gradaudit.attacks.causal.repair import repair
from gradaudit.attacks.causal.screen import Screen, relative_residual
from gradaudit.attacks.causal.solve import GrowthPlan, choose, grow_all, uncovered
from gradaudit.attacks.precision import rough_dtype, rough_twin
from gradaudit.errors import GradAuditError
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.gradients.spectrum import Spectrum, label, spectrum
from gradaudit.model.adapter import ModelLayout
from gradaudit.model.families import is_causal_lm, layout

# The screen's features come from this layer at most: on SmolLM2 layer 2's inputs led the
# search at layer 15 as well as layer 15's own, and their vocabulary pass runs 3 layers, not 16.
FEATURE_LAYER = 2
# ... except for components whose input is not the normalised residual stream (an attention
# mix, an FFN activation): layer 2's features stand for it poorly (docs/span-method.md).
OWN_LAYER_FEATURES = ("attn_output", "ffn_out")

THREAT_MODEL = (
    "weights, tokenizer and sentence lengths known; the text (input ids, and a causal LM's "
    "labels, which are the text) never read"
)


def lengths_of(snapshot: GradientSnapshot) -> list[int]:
    """Each sentence's length from the attention mask; left padding is refused."""
    mask = snapshot.batch["attention_mask"]
    lengths = [int(n) for n in mask.sum(1)]
    for b, n in enumerate(lengths):
        if not bool(mask[b, :n].all()):
            raise GradAuditError(
                f"sentence {b} is not right-padded: the causal attack grows each sentence from "
                "column 0, so capture the batch with right padding (make_batch does)"
            )
    return lengths


def pick_module(
    lay: ModelLayout,
    snapshot: GradientSnapshot,
    min_gap: float,
    device,
    tokens: int,
    pooled: bool,
):
    """The observed module to attack: the shallowest with a usable span, and every spectrum.

    A span is usable when its rank is below the module's input width and, with more visible
    `tokens` than the module has output rows, below the rows too: there the rank stops at the
    rows, the row space is a slice of the inputs' span, and no single input need lie in it
    (SmolLM2's key and value have 192 rows: SST-2, B = 16 has about 300 tokens). With a
    `pooled` head (a sequence classifier) the last layer is not usable: only the pooled token
    reaches the loss from it, so its gradient holds one mixture per head and sentence."""
    noisy = snapshot.kind == "noised"
    spectra: dict[str, Spectrum] = {}
    for m in snapshot.modules:
        grad = snapshot.weight_gradient(m).to(device)
        spectra[m] = spectrum(grad, noisy=noisy, min_gap=min_gap, name=m)
    labels = {m: label(s, tokens, True) for m, s in spectra.items()}
    where = {m: lay.locate(m) for m in spectra}
    for m, at in where.items():
        if pooled and at is not None and at[1] == lay.num_layers - 1:
            labels[m] = "pooled"
    unusable = ("partial", "saturated", "zero", "pooled")
    usable = [m for m in spectra if where[m] is not None and labels[m] not in unusable]
    if not usable:
        found = ", ".join(
            f"{m}: {labels[m]}, rank {s.rank} of {s.rows} rows x {s.width} inputs"
            for m, s in spectra.items()
        )
        raise GradAuditError(
            f"no observed module has a usable span for the causal attack ({found}): it needs "
            "a per-token linear module whose gradient rank is below its input width, and below "
            f"its output rows when the batch has more visible tokens ({tokens}) than rows, and "
            "not at a sequence classifier's last layer (pooled): audit a module with more "
            "rows (query, ffn_in, ffn_gate, ffn_out), a smaller batch, or an earlier layer"
        )
    return min(usable, key=lambda m: where[m][1]), spectra


def first_seen(lay: ModelLayout, module: str) -> int:
    """The first position the module's gradient has a row for: a query's first token attends
    to itself alone (softmax of one score), so its query gets no gradient."""
    component, _ = lay.locate(module)
    return 1 if component == "query" else 0


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before every text (e.g. BOS): known, not guessed."""
    ids = tokenizer("a")["input_ids"]
    special = special_ids(tokenizer)
    out = []
    for i in ids:
        if i not in special:
            break
        out.append(int(i))
    return out


def anchor_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the screen's features follow: ".", a context-neutral one. A sentence's first
    token as anchor left many next tokens out of the regression's reach (docs/span-method.md,
    "The screen")."""
    ids = tokenizer(".", add_special_tokens=False)["input_ids"]
    if not ids:
        raise GradAuditError(
            f"the tokenizer {type(tokenizer).__name__} encodes '.' as no token, and the causal "
            "attack's screen needs it as its anchor: use a tokenizer with a '.' token"
        )
    return int(ids[0])


def make_screen(
    model: nn.Module,
    lay: ModelLayout,
    module: str,
    basis: torch.Tensor,
    vocab: torch.Tensor,
    opts: CausalOptions,
    anchor: int,
) -> tuple[Screen, str]:
    """The screen of `module`'s row space after token `anchor` (with a rough twin of the
    model where `opts` and the device give one), and the module whose inputs are its
    features."""
    component, layer = lay.locate(module)
    if component not in OWN_LAYER_FEATURES:
        layer = min(layer, FEATURE_LAYER)
    features = lay.component_name(component, layer)
    twin = rough_twin(model, rough_dtype(opts.rough_dtype, basis.device))
    screen = Screen(
        PrefixRunner(model, module, lay.num_layers),
        basis,
        vocab,
        opts.forward_batch,
        opts.tol,
        anchor,
        PrefixRunner(model, features, lay.num_layers) if features != module else None,
        PrefixRunner(twin, module, lay.num_layers) if twin is not None else None,
    )
    return screen, features


class CausalSpanAttack(Attack):
    """Grow a decoder's sentences token by token inside one module's gradient row space."""

    name = "causal"
    Options = CausalOptions

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
        if not lay.family.decoder:
            raise GradAuditError(
                f"the causal attack needs a decoder (causal attention), and {type(model).__name__}"
                f" is a {lay.family.name} encoder: use the span or auto attack"
            )
        lengths = lengths_of(snapshot)
        causal = is_causal_lm(model)  # else a classifier: its head reads one pooled token
        visible = sum(lengths) - (len(lengths) if causal else 0)
        module, spectra = pick_module(lay, snapshot, opts.min_gap, device, visible, not causal)
        spec = spectra[module]
        basis = spec.basis.to(device)
        vocab = candidate_token_ids(tokenizer).to(device)
        screen, features = make_screen(
            model, lay, module, basis, vocab, opts, anchor_token(tokenizer)
        )
        info: dict[str, Any] = {
            "module": module,
            "spectra": {m: s.summary() for m, s in spectra.items()},
            "threat_model": THREAT_MODEL,
            "unsure": [],
            "blind": [],
            "screen_features": features,  # whose inputs the screen's regression starts from
        }
        if position_free(lay, module) and causal:
            prefixes = self._order(model, module, snapshot, screen, lengths, info, tokenizer)
        else:
            seen = first_seen(lay, module)
            plan = GrowthPlan(
                spec.width,
                first_seen=seen,
                unseen_tail=1 if causal else 0,
                fixed=dict(enumerate(special_prefix(tokenizer))),
                guesses=opts.frequent,
                stand_ins=(
                    stand_in_tokens(tokenizer, vocab, opts.stand_ins, opts.frequent)
                    if seen == 1
                    else None
                ),
            )
            rounds = max(1, round(opts.rounds * budget))
            guess = NextTokenGuess(model, vocab, opts.guesses) if causal and opts.guesses else None
            grower = Grower(screen, opts, torch.Generator().manual_seed(seed), rounds, guess)
            prefixes = self._grow(grower, lengths, plan, basis, info)
        token_ids = self._finish(model, module, snapshot, lengths, prefixes, info)
        if (rough := screen.rough_summary()) is not None:
            info["rough_checks"] = rough
        return Reconstruction(
            token_ids=token_ids,
            texts=decode(tokenizer, token_ids),
            attack=self.name,
            options=self.options_dict(),
            info=info,
        )

    @staticmethod
    def _grow(
        grower: Grower,
        lengths: list[int],
        plan: GrowthPlan,
        basis: torch.Tensor,
        info: dict[str, Any],
    ) -> dict[int, torch.Tensor]:
        """Prefixes grown in the row space (see `grow`), one chosen per sentence."""
        done = grow_all(grower, lengths, plan)
        tol = grower.options.tol
        picked, info["repaired"] = repair(
            grower, done, choose(done, basis, tol), lengths, plan, basis
        )
        info["uncovered"] = uncovered(basis, [done[b].inputs[r] for b, r in picked.items()], tol)
        info["unsure"] = sorted(set(done[0].unsure)) if done else []
        info["blind"] = plan.blind
        return {b: done[b].tokens[picked[b]] for b in done}

    def _order(
        self,
        model: nn.Module,
        module: str,
        snapshot: GradientSnapshot,
        screen: Screen,
        lengths: list[int],
        info: dict[str, Any],
        tokenizer: PreTrainedTokenizerBase,
    ) -> dict[int, torch.Tensor]:
        """Prefixes of a position-free module (see `order`): the token set, ordered."""
        vocab = screen.vocab
        residual = relative_residual(FirstPosition(screen).inputs(), screen.basis)
        tokens = vocab[residual <= self.options.tol]
        info["token_set"] = tokens.tolist()
        info["order"] = (
            "searched: this module's input is the same at every position (layer 0 of a rotary "
            "model), so the gradient gives the token set exactly and the order is the model's "
            "likeliest arrangement, checked against the gradient"
        )
        last = LastTokens(model, module, snapshot.weight_gradient(module))
        start = next(
            t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0) if t is not None
        )
        free = None
        if first_seen(layout(model), module) == 1:  # a query's first token: not in the set
            free = vocab
            info["blind"] = [(b, 0) for b in range(len(lengths))]
            info["order"] += "; each first token (no query row) is the model's guess"
        orderer = Orderer(model, last, tokens, self.options.order_beam, start, free)
        return orderer.order(lengths)

    def _finish(
        self,
        model: nn.Module,
        module: str,
        snapshot: GradientSnapshot,
        lengths: list[int],
        prefixes: dict[int, torch.Tensor],
        info: dict[str, Any],
    ) -> list[list[int]]:
        """Every sentence's tokens: its prefix and its last token (see `last`)."""
        causal = is_causal_lm(model)
        with_prefix = {b: p for b, p in prefixes.items() if p.numel() > 0}
        last: dict[int, int] = {}
        solver = LastTokens(model, module, snapshot.weight_gradient(module)) if causal else None
        if solver and with_prefix and self.options.last == "gradient":
            last, misfit = solver.solve(with_prefix)
            info["last_misfit"] = misfit
        elif solver and with_prefix and self.options.last == "model":
            last = solver.guesses(with_prefix)
        unidentified = [(b, n - 1) for b, n in enumerate(lengths) if causal and b not in last]
        info["last_token"] = self.options.last if causal else "seen (not a causal LM)"
        # a blind position is identified by the next one, unless nothing fitted there
        unsure = set(info["unsure"])
        ordered = "token_set" in info  # no growth judged the blind positions
        guessed = {(b, p) for b, p in info["blind"] if (b, p + 1) in unsure or ordered}
        info["unidentified"] = sorted(set(unidentified) | guessed)
        token_ids = []
        for b, n in enumerate(lengths):
            ids = prefixes[b].tolist() if b in prefixes else []
            ids = ids + ([last[b]] if b in last else [])
            token_ids.append((ids + [0] * n)[:n])
        if solver:
            info["gradient_residual"] = solver.gradient_residual(token_ids)
        return token_ids
