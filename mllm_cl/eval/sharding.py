"""Evaluation under several processes: each test sample scored exactly once.

``DistributedSampler`` pads the last shard with repeated samples so that all
ranks have the same length, which would count those samples twice. Here each
rank takes every ``world``-th index with no padding, and the predictions of
all ranks are gathered and put back in dataset order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import Sampler

from mllm_cl.distributed import world


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``0..n-1``: a partition, no padding."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows, on every rank, sorted by their dataset ``index``."""
    _, size = world()
    if size == 1:
        return rows
    parts: list[list[dict[str, Any]] | None] = [None] * size
    dist.all_gather_object(parts, rows)
    merged = [r for part in parts for r in part]
    merged.sort(key=lambda r: r["index"])
    return merged


def gather_messages(messages: list[str]) -> list[str]:
    """Every rank's messages (skipped test rows, ...), on every rank, rank 0's first."""
    _, size = world()
    if size == 1:
        return list(messages)
    parts: list[list[str] | None] = [None] * size
    dist.all_gather_object(parts, list(messages))
    return [m for part in parts for m in part]
