"""`ModelLayout`: a family bound to one model instance (full module names, embeddings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from gradaudit.errors import GradAuditError
from gradaudit.model.lora import split_part

if TYPE_CHECKING:
    from gradaudit.model.families import Family


@dataclass(frozen=True)
class ModelLayout:
    """A family bound to one model instance: full module names and embedding access."""

    family: Family
    model: nn.Module
    prefix: str

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def max_positions(self) -> int:
        """The longest sequence the model takes (its context)."""
        return int(self.model.config.max_position_embeddings)

    @property
    def components(self) -> tuple[str, ...]:
        """The component names this family has (see families.COMPONENTS)."""
        return tuple(self.family.components)

    def component_name(self, component: str, layer: int) -> str:
        """Full module name of `component` in layer `layer`."""
        if component not in self.family.components:
            raise GradAuditError(
                f"the {self.family.name} family has no {component!r} module: its components are "
                f"{', '.join(self.family.components)}"
            )
        return f"{self.prefix}{self.family.layers}.{layer}.{self.family.components[component]}"

    def layer_prefix(self, layer: int) -> str:
        return f"{self.prefix}{self.family.layers}.{layer}."

    def locate(self, module_name: str) -> tuple[str, int] | None:
        """(component, layer) of a module name (a LoRA part: of the module it wraps), or None
        when it is not a known component."""
        from gradaudit.model.families import locate_name

        found = locate_name(module_name, (self.family,))
        if found is None or found[1] >= self.num_layers:
            return None
        return found if self.component_name(*found) == split_part(module_name)[0] else None

    @property
    def bert_embeddings(self) -> bool:
        """True when layer 0's input is LayerNorm(word + position + token type embedding), a
        per-token function of (token, position, segment), as in BERT and RoBERTa."""
        family = self.family
        parts = (family.position_embeddings, family.token_type_embeddings, family.embedding_norm)
        return all(part is not None for part in parts)

    def submodule(self, relative: str) -> nn.Module:
        return self.model.get_submodule(f"{self.prefix}{relative}")

    def _part(self, relative: str | None, what: str) -> nn.Module:
        if relative is None:
            raise GradAuditError(
                f"the {self.family.name} family has no {what} ({self.family.lacks}): this needs "
                "an absolute-position encoder with token types (the BERT or RoBERTa family) and "
                f"is not supported for the {self.family.name} family yet"
            )
        return self.submodule(relative)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.submodule(self.family.word_embeddings)

    @property
    def position_embeddings(self) -> nn.Embedding:
        return self._part(self.family.position_embeddings, "position embeddings")

    @property
    def token_type_embeddings(self) -> nn.Embedding:
        return self._part(self.family.token_type_embeddings, "token type embeddings")

    @property
    def embedding_norm(self) -> nn.LayerNorm:
        return self._part(self.family.embedding_norm, "LayerNorm after the embeddings")

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids the model uses by default for a batch with this attention mask.

        A token's position is its column (RoBERTa: counted from padding_idx + 1 over real
        tokens), as the model computes it when given no position ids.
        """
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
