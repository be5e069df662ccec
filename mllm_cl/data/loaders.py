"""DataLoader options resolved for the machine, and a training loader whose workers outlive a Trainer.

``data.num_workers: auto`` and ``data.pin_memory: auto`` are resolved when a
loader is built (so they see the process's own environment: its CPUs, its
GPUs, how many processes share the node):

- workers: with CUDA, ``min(8, max(1, cpus // processes_per_node - 1))``, one
  CPU left to the training process; without CUDA, 0 (samples are prepared in
  the training process, which has the CPUs to itself);
- pinned memory: with CUDA.

``KeptWorkers`` keeps its worker processes from one Trainer to the next: each
training phase builds a fresh Trainer, and Lightning shuts a loader's workers
down when a fit ends, so a task's phases would otherwise start them anew each
time.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from mllm_cl.distributed import world

MAX_AUTO_WORKERS = 8


def check_workers(value: int | str) -> int | str:
    """``value`` if it is a worker count (an int >= 0) or ``"auto"``; else a ValueError naming ``data.num_workers``."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"data.num_workers must be an int >= 0 or 'auto', got {value!r}")


def check_pin_memory(value: bool | str) -> bool | str:
    """``value`` if it is a bool or ``"auto"``; else a ValueError naming ``data.pin_memory``."""
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"data.pin_memory must be true, false or 'auto', got {value!r}")


def cuda_usable() -> bool:
    return torch.cuda.is_available()


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def processes_per_node() -> int:
    """Training processes sharing this machine: ``LOCAL_WORLD_SIZE`` where the launcher sets it (torchrun),
    else the processes of the run (``WORLD_SIZE`` or the process group) capped by the visible GPUs, one each."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    size = max(world()[1], int(os.environ.get("WORLD_SIZE") or 1))
    if size > 1 and cuda_usable():
        size = min(size, max(1, torch.cuda.device_count()))
    return size


def resolve_workers(value: int | str) -> int:
    """The worker count ``data.num_workers`` means in this process."""
    value = check_workers(value)
    if value != "auto":
        return value
    if not cuda_usable():
        return 0
    return min(MAX_AUTO_WORKERS, max(1, usable_cpus() // processes_per_node() - 1))


def resolve_pin_memory(value: bool | str) -> bool:
    """Whether ``data.pin_memory`` pins batches in this process."""
    value = check_pin_memory(value)
    return cuda_usable() if value == "auto" else value


class KeptWorkers(DataLoader):
    """A DataLoader with persistent workers that stay up when a Trainer's fit ends.

    Each pass (``iter``) follows the order a loader without persistent workers
    would: a fresh iterator draws its workers' base seed from ``generator``
    before the sampler draws its order, and a persistent pass draws it too.
    ``rewind()`` puts ``generator`` (and a ``DistributedSampler``'s epoch) back
    where they were when the loader was built, so the next pass is the first
    pass of a fresh loader. ``close()`` stops the workers now (they also stop
    when the loader is garbage collected).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["persistent_workers"] = kwargs.get("num_workers", 0) > 0
        super().__init__(*args, **kwargs)
        self._workers = None
        self._start = self.generator.get_state() if self.generator is not None else None

    # Lightning's teardown shuts down and forgets ``loader._iterator``: the workers live in ``_workers``.
    @property
    def _iterator(self) -> None:
        return None

    @_iterator.setter
    def _iterator(self, value: Any) -> None:
        pass

    def __iter__(self):
        if self.num_workers == 0:
            return self._get_iterator()
        if self._workers is None:
            self._workers = self._get_iterator()
        else:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # as a fresh iterator does
            self._workers._reset(self)
        return self._workers

    def rewind(self) -> KeptWorkers:
        """The next pass is that of the loader as built (the same generator state and sampler epoch)."""
        if self._start is not None:
            self.generator.set_state(self._start)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(0)
        return self

    def close(self) -> None:
        """Stop the worker processes."""
        if self._workers is not None:
            self._workers._shutdown_workers()
            self._workers = None


__all__ = ["KeptWorkers", "check_pin_memory", "check_workers", "processes_per_node", "resolve_pin_memory",
           "resolve_workers", "usable_cpus"]
