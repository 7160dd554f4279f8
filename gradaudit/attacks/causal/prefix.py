"""Run one new token after each of many cached prefixes, up to the observed module.

Every position of a causal model sees only tokens at or before it, so a prefix's key/value
cache, grown one token at a time, gives the next token's module input from a one-token
forward pass. A forward pre-hook on the module records its input and stops the pass there:
layers past the module are never run, and the cache holds exactly what the next position
needs (the layers the pass went through).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from gradaudit.model.lora import inner_model

# Per model layer: the cached (keys, values) of every prefix row, or None where never reached.
KV = list[tuple[torch.Tensor, torch.Tensor] | None]


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a key/value cache: transformers 5 renamed
    `past_key_values` to `cache`; a PEFT wrapper passes it on."""
    params = inspect.signature(inner_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Stop(Exception):
    """Raised by the hook: the module's input is all the pass was for."""


class PrefixRunner:
    """Module inputs of one-token extensions of cached prefixes (rows of a `KV`)."""

    def __init__(self, model: nn.Module, module: str, num_layers: int) -> None:
        self.model = model
        self.module = model.get_submodule(module)
        self.num_layers = num_layers
        self.cache_arg = cache_argument(model)
        self.dtype = next(model.parameters()).dtype  # a rough twin's: caches are cast to it

    def empty(self) -> KV:
        return [None] * self.num_layers

    def run(
        self,
        kv: KV,
        rows: torch.Tensor,
        position: int,
        *,
        ids: torch.Tensor,
    ) -> tuple[torch.Tensor, KV]:
        """Inputs (N, width) of the module for tokens `ids` (N,) at `position` after prefix
        rows `rows` (N,) of `kv`, and those rows' caches grown by the token."""
        data = [(None, None) if e is None else self._cast(e, rows) for e in kv]
        cache = DynamicCache(ddp_cache_data=data)
        n = int(rows.shape[0])
        seen: list[torch.Tensor] = []

        def stop(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.append(args[0])
            raise _Stop

        handle = self.module.register_forward_pre_hook(stop)
        positions = torch.full((n, 1), position, dtype=torch.long, device=rows.device)
        inputs = {"input_ids": ids.unsqueeze(1), self.cache_arg: cache}
        try:
            self.model(**inputs, position_ids=positions, use_cache=True)
        except _Stop:
            pass
        finally:
            handle.remove()
        grown: KV = [
            (layer.keys, layer.values) if layer.is_initialized and layer.keys.numel() else None
            for layer in cache.layers
        ]
        return seen[0].reshape(n, -1), grown

    def _cast(
        self, layer: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `rows` of one layer's cached (keys, values), in the model's dtype."""
        return layer[0][rows].to(self.dtype), layer[1][rows].to(self.dtype)


def select(kv: KV, rows: torch.Tensor) -> KV:
    """The cache rows `rows` of `kv`."""
    return [None if e is None else (e[0][rows], e[1][rows]) for e in kv]


def truncate(kv: KV, length: int) -> KV:
    """`kv` cut to its first `length` positions: the cache of each row's prefix that long."""
    if length == 0:
        return [None] * len(kv)
    return [None if e is None else (e[0][:, :, :length], e[1][:, :, :length]) for e in kv]


def concat(parts: list[KV]) -> KV:
    """Rows of several caches (same layers reached) stacked."""
    out: KV = []
    for layer in zip(*parts):
        if layer[0] is None:
            out.append(None)
        else:
            out.append((torch.cat([e[0] for e in layer]), torch.cat([e[1] for e in layer])))
    return out
