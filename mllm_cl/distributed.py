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
