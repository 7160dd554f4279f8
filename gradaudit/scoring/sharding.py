"""Sharding attacks over ranks launched by torchrun or `accelerate launch`.

Rank i of k takes items i, i + k, ...; rank 0 gathers every rank's results (over gloo: only
result lists travel, never tensors).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's rank among `world` ranks."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls) -> Shard:
        """The shard `RANK` and `WORLD_SIZE` name (a single rank when they are unset)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def mine(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """(global index, item) of the items this rank handles."""
        return list(enumerate(items))[self.rank :: self.world]

    def device(self, device: str | None) -> str | None:
        """`device`, or under several ranks with `auto` and GPUs, this rank's local GPU."""
        if self.world > 1 and device == "auto" and torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
        return device

    def start(self) -> None:
        """Join the process group (CPU collectives) when there is more than one rank."""
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo")

    def gather(self, indexed: list[tuple[int, Any]]) -> list[Any] | None:
        """Every rank's (index, result) pairs on rank 0, in index order; None on other ranks."""
        if self.world == 1:
            return [result for _, result in sorted(indexed, key=lambda p: p[0])]
        import torch.distributed as dist

        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(indexed, gathered, dst=0)
        dist.destroy_process_group()
        if self.rank != 0:
            return None
        pairs = sorted((pair for part in gathered for pair in part), key=lambda p: p[0])
        return [result for _, result in pairs]
