"""The `auto` attack: a span attack where the gradient spectrum allows it, `gradmatch` elsewhere.

A span attack runs when some observed module is labelled `exact` (layer-0 query/key/value) or
`span` (any other linear module with a rank below the width): `causal` on a decoder, whose
inputs grow position by position, `span` on an encoder. Every other snapshot (saturated,
rank-limited) goes to gradmatch, and so does a decoder's `partial` one (a LoRA lora_A with
fewer rows r than tokens), which an encoder's span attack uses through its reverse test; an
all-zero gradient is not attacked. `info["auto"]` records what ran and why, and
`info["regime"]` the regime (span exact, span partial, gradient matching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import Attack, Reconstruction
from gradaudit.attacks.registry import get_attack
from gradaudit.attacks.span.attack import module_labels, module_spectra
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.families import layout


@dataclass
class AutoOptions:
    """`min_gap` decides the rank (see spectrum); `progress` is passed on to span."""

    min_gap: float = 50.0
    progress: bool = False


class AutoAttack(Attack):
    """Pick span (encoders), causal (decoders) or gradmatch per snapshot from its spectra."""

    name = "auto"
    Options = AutoOptions

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
        spectra = module_spectra(model, snapshot, self.options.min_gap, device)
        tokens = int(snapshot.batch["attention_mask"].sum())
        lay = layout(model)
        labels = module_labels(model, spectra, tokens, lay)
        usable = sorted(m for m, lab in labels.items() if lab in ("exact", "span"))
        partial = sorted(m for m, lab in labels.items() if lab == "partial")
        if usable and lay.family.decoder:  # a decoder's inputs grow position by position
            chosen = get_attack("causal", min_gap=self.options.min_gap)
            why = f"{', '.join(usable)}: rank below the width (causal span, a decoder)"
        elif usable or partial and not lay.family.decoder:
            opts = self.options
            chosen = get_attack("span", min_gap=opts.min_gap, progress=opts.progress)
            mode = "exact" if any(labels[m] == "exact" for m in usable) else "deep"
            why = f"{', '.join(usable + partial)}: rank below the width ({mode} span)"
            if partial:
                why += f"; {', '.join(partial)} partial: the inputs must span its row space"
        else:
            chosen = get_attack("gradmatch")
            why = (
                "no module has a span every input lies in (labels: "
                + ", ".join(f"{m}={lab}" for m, lab in labels.items())
                + ")"
            )
        result = chosen.reconstruct(
            model, snapshot, tokenizer=tokenizer, seed=seed, device=device, budget=budget
        )
        result.info["auto"] = {"ran": chosen.name, "why": why, "labels": labels}
        result.attack = self.name
        result.options = {**self.options_dict(), chosen.name: result.options}
        return result
