"""Several processes (Lightning's ``ddp``): who writes, what is shared, what is summed.

Outside a process group every helper is the identity for one process, so
single-process code paths run the same calls. Components use these instead
of ``torch.distributed`` directly, and never need Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Rank 0 writes the run directory; the others compute the same things and keep quiet."""
    return world()[0] == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, on ``tensor``'s device (the input is left as it was).

    The reduction runs where the backend can (NCCL: the current GPU; gloo: the CPU)."""
    if world()[1] == 1:
        return tensor
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = tensor.to(where, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (n_r, ...) concatenated in rank order (ranks may hold different n_r)."""
    _, size = world()
    if size == 1:
        return rows
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([rows.shape[0]], device=where)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    longest = int(max(c.item() for c in counts))
    padded = rows.new_zeros(longest, *rows.shape[1:]).to(where)
    padded[: rows.shape[0]] = rows.to(where)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=False)]).to(rows.device)
