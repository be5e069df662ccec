"""Run a test's worker under two gloo processes on the CPU.

``spawn_two(worker, *args, store=tmp_path / "store")`` starts two processes; each joins a gloo group
through the file store and calls ``worker(rank, *args)``, which writes what it found under the test's
``tmp_path`` for the test to compare. When both are done they meet at a barrier, leave the group and
exit at once: gloo's threads can abort a process (``terminate called without an active exception``)
while the interpreter tears itself down, which would fail a test whose results are already written.
An exception in ``worker`` still reaches the test with its traceback, as ``mp.spawn`` reports it.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, worker, store: str, args: tuple) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    worker(rank, *args)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_two(worker, *args, store) -> None:
    """``worker(rank, *args)`` in two processes of one gloo group; ``store``: a path that does not exist yet."""
    mp.spawn(_entry, args=(worker, str(store), args), nprocs=2, join=True)
