"""SAME's statistics per optimizer step and adapted layer, at 7B widths, on 1 to 4 gloo processes.

Each process (one torch thread) holds one layer's statistics at width ``d`` and sees
``--rows`` input rows per step (SAME's ``stat_tokens``), and times the statistics work of
an optimizer step, amortized over ``refresh_every`` (20) steps:

- ``gathered fp64`` (the reference): every step, every process's rows gathered to every
  process, folded into a float64 incremental SVD of the running covariance; an
  eigendecomposition for the router every 20 steps;
- ``local`` (``covariance: local``, the default): every 20 steps, one randomized range
  finder in float32 over every process's rows (a ``d x k`` all-reduce, no rows cross);
- ``running`` (``covariance: running``): the same estimate folded into a float32 Frequent
  Directions sketch over all tasks, and its eigendecomposition.

Every variant also all-reduces the activation sums (2E + 1 numbers) every step. The
reference's per-step cost is constant, so it is timed over ``--ref-steps`` steps and its
eigendecomposition added at 1/20; the others are timed over whole refresh periods.

    python benchmarks/same_statistics.py [--dims 4096 11008] [--procs 1 2 4] [--rows 256]

Target: local at most 5 ms per layer and step, within 1.5x from 1 to 4 processes.
On a 2-core machine 4 processes share 2 cores: their times include waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_cl.distributed import all_gather_rows, all_reduce_sum  # noqa: E402
from mllm_cl.experts.spectral import CovarianceSketch, kept_directions, range_finder  # noqa: E402

K, REFRESH, EXPERTS = 64, 20, 4


class Clock:
    """Wall and process CPU seconds since ``start``."""

    def start(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def reference(d: int, rows: torch.Tensor, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the gathered float64 path (the eigendecomposition at 1/REFRESH)."""
    sketch = CovarianceSketch(d, K)
    clock = Clock().start()
    for _ in range(steps):
        sketch.update(all_gather_rows(rows.double()))
        all_reduce_sum(torch.zeros(2 * EXPERTS + 1, dtype=torch.float64))
    step_wall, step_cpu = clock.read()
    clock.start()
    vecs, vals, trace = sketch.eig()
    kept_directions(vals, trace, 0.9, K)
    eig_wall, eig_cpu = clock.read()
    return step_wall / steps + eig_wall / REFRESH, step_cpu / steps + eig_cpu / REFRESH


def estimate(d: int, rows: torch.Tensor, periods: int, running: bool) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the local (or running) path over ``periods`` refresh periods."""
    sketch = CovarianceSketch(d, K, dtype=torch.float32, shrink=True) if running else None
    clock = Clock().start()
    for step in range(periods * REFRESH):
        if step % REFRESH == 0:
            directions, sigma, moments = range_finder(rows, K, seed=step, centered=not running,
                                                      reduce=all_reduce_sum)
            if running:
                n = moments["count"]
                energy = sigma.square() * (n - 1) * REFRESH
                sketch.update(energy.sqrt()[:, None] * directions.T, count=float(n) * REFRESH,
                              total=moments["total"] * REFRESH, squares=moments["squares"] * REFRESH)
                vecs, vals, trace = sketch.eig()
            else:
                vals, trace = sigma.square(), sigma.square().sum()
            kept_directions(vals, trace, 0.9, K)
        all_reduce_sum(torch.zeros(2 * EXPERTS + 1, dtype=torch.float64))
    wall, cpu = clock.read()
    return wall / (periods * REFRESH), cpu / (periods * REFRESH)


def worker(rank: int, world: int, init: str, out: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        results = {}
        for d in args.dims:
            rows = torch.randn(args.rows, d, generator=torch.Generator().manual_seed(rank)) * torch.linspace(3, 0.1, d)
            dist.barrier()
            results[(d, "gathered fp64")] = reference(d, rows, args.ref_steps)
            dist.barrier()
            results[(d, "local")] = estimate(d, rows, args.periods, running=False)
            dist.barrier()
            results[(d, "running")] = estimate(d, rows, args.periods, running=True)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[4096, 11008], help="layer input widths")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="gloo process counts")
    parser.add_argument("--rows", type=int, default=256, help="rows per process and step (stat_tokens)")
    parser.add_argument("--ref-steps", type=int, default=3, help="steps the reference is timed over")
    parser.add_argument("--periods", type=int, default=2, help="refresh periods the new paths are timed over")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    table = {}
    for world in args.procs:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(world, f"{tmp}/init", tmp, args), nprocs=world, join=True)
            per_rank = [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]
        for key in per_rank[0]:
            for i, clock in enumerate(("wall", "cpu")):  # the slowest process sets the step
                table[(*key, world, clock)] = max(r[key][i] for r in per_rank)
    for clock, what in (("wall", "wall time"), ("cpu", "the process's own CPU time (no waiting for a core)")):
        print(f"SAME statistics per optimizer step and layer, ms of {what}; slowest process, {args.rows} rows "
              f"per process and step, k = {K}, refresh every {REFRESH} steps, one thread per process")
        header = "".join(f"{f'{w} proc':>12}" for w in args.procs)
        ends = 4 in args.procs and 1 in args.procs
        print(f"{'d':>6}  {'path':<14}{header}{'4/1 ratio' if ends else '':>11}")
        for d in args.dims:
            for path in ("gathered fp64", "local", "running"):
                cells = "".join(f"{1000 * table[(d, path, w, clock)]:>12.2f}" for w in args.procs)
                ratio = f"{table[(d, path, 4, clock)] / table[(d, path, 1, clock)]:>11.2f}" if ends else ""
                print(f"{d:>6}  {path:<14}{cells}{ratio}")
        print()


if __name__ == "__main__":
    main()
