"""Model-family adapters: where embeddings and per-layer linear components live.

Everything that depends on a model's module layout goes through a `Family`, so the rest of
gradaudit never builds module names by string hacks of its own.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from gradaudit.errors import GradAuditError

COMPONENTS = ("query", "key", "value", "attn_output", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class Family:
    """Layout of one encoder family, relative to the model's base model (e.g. `bert`)."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "encoder.layer"
    components: dict[str, str] = field(
        default_factory=lambda: {
            "query": "attention.self.query",
            "key": "attention.self.key",
            "value": "attention.self.value",
            "attn_output": "attention.output.dense",
            "ffn_in": "intermediate.dense",
            "ffn_out": "output.dense",
        }
    )
    word_embeddings: str = "embeddings.word_embeddings"
    position_embeddings: str = "embeddings.position_embeddings"
    token_type_embeddings: str = "embeddings.token_type_embeddings"
    embedding_norm: str = "embeddings.LayerNorm"
    # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
    position_offset_from_padding: bool = False


BERT = Family("bert", ("bert",))
ROBERTA = Family(
    "roberta", ("roberta", "xlm-roberta", "camembert"), position_offset_from_padding=True
)
FAMILIES = (BERT, ROBERTA)


def locate_name(
    module_name: str, families: tuple[Family, ...] = FAMILIES
) -> tuple[str, int] | None:
    """(component, layer) read from a module name alone (no model), or None when unknown."""
    for family in families:
        for component, relative in family.components.items():
            layers, tail = re.escape(family.layers), re.escape(relative)
            match = re.search(rf"(?:^|\.){layers}\.(\d+)\.{tail}$", module_name)
            if match:
                return component, int(match.group(1))
    return None


def _layer_ranges(layers: list[int]) -> str:
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def modules_label(module_names: Iterable[str]) -> str:
    """Short label of a module set, e.g. `query@0-2, ffn_in@4`; unknown names stay in full."""
    layers: dict[str, list[int]] = {}
    others: list[str] = []
    for name in module_names:
        found = locate_name(name)
        if found is None:
            others.append(name)
        else:
            layers.setdefault(found[0], []).append(found[1])
    parts = [f"{c}@{_layer_ranges(layers[c])}" for c in COMPONENTS if c in layers]
    return ", ".join(parts + others)


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    for name, module in model.named_modules():
        if module is base:
            return f"{name}." if name else ""
    return ""


@dataclass(frozen=True)
class ModelLayout:
    """A family bound to one model instance: full module names and embedding access."""

    family: Family
    model: nn.Module
    prefix: str

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def component_name(self, component: str, layer: int) -> str:
        """Full module name of `component` (see COMPONENTS) in encoder layer `layer`."""
        return f"{self.prefix}{self.family.layers}.{layer}.{self.family.components[component]}"

    def layer_prefix(self, layer: int) -> str:
        return f"{self.prefix}{self.family.layers}.{layer}."

    def locate(self, module_name: str) -> tuple[str, int] | None:
        """(component, layer) of a module name, or None when it is not a known component."""
        found = locate_name(module_name, (self.family,))
        if found is None or found[1] >= self.num_layers:
            return None
        return found if self.component_name(*found) == module_name else None

    def submodule(self, relative: str) -> nn.Module:
        return self.model.get_submodule(f"{self.prefix}{relative}")

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.submodule(self.family.word_embeddings)

    @property
    def position_embeddings(self) -> nn.Embedding:
        return self.submodule(self.family.position_embeddings)

    @property
    def token_type_embeddings(self) -> nn.Embedding:
        return self.submodule(self.family.token_type_embeddings)

    @property
    def embedding_norm(self) -> nn.LayerNorm:
        return self.submodule(self.family.embedding_norm)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids the model uses for a right-padded batch with this attention mask."""
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        positions = positions.expand_as(attention_mask)
        if self.family.position_offset_from_padding:
            pad = int(self.model.config.pad_token_id)
            positions = (positions + pad + 1) * attention_mask + pad * (1 - attention_mask)
        return positions

    def embed_tokens(
        self, token_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        """The encoder's layer-0 input for given tokens: LayerNorm(word + position + type)."""
        summed = (
            self.word_embeddings(token_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.embedding_norm(summed)


def layout(model: nn.Module) -> ModelLayout:
    """The family adapter for `model`; a clear error for families not supported yet."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return ModelLayout(family, model, _base_prefix(model))
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise GradAuditError(
        f"model type {model_type!r} has no gradaudit family adapter yet (supported: {supported}); "
        "select modules by glob, or add a Family in gradaudit/model/families.py"
    )


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run attention with the eager kernel, which supports the double backward attacks need."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    if setter is not None:
        setter("eager")
    else:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if setter is not None:
            setter(previous)
        else:
            config._attn_implementation = previous
