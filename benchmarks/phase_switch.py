"""What switching phases costs: a real `mllm-cl fit` under 2-process gloo DDP, now and at another commit.

Runs routing-CL (two phases per task: expert, gate) on two small synthetic tasks with a
random backbone made wide enough that moving or broadcasting it shows (``--width``,
``--layers``; about 100M parameters by default), with ``--trainer.strategy ddp
--trainer.devices 2`` on the CPU. A callback in every process records:

- the phase switch: from the last batch of the expert phase to the first batch of the
  gate phase of the same task (the fit's teardown, the method's hooks, the next Trainer,
  its setup and DDP's wrap with its broadcast);
- the bytes DDP's wrap broadcast in each fit;
- the process's peak resident memory (ru_maxrss) at the end.

``--ref REF`` runs the same command in a git worktree of REF first, as the reference
(the callback is injected from this file; the code under test is the worktree's).

    python benchmarks/phase_switch.py [--ref d175cf4] [--width 1024] [--layers 8] [--steps 3]

On the CPU the model's device is the CPU, so Lightning's move to the CPU after each fit
is free here; what the table shows is DDP's broadcast and the Trainer's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
OUT_ENV = "MLLM_CL_PHASE_CLOCK"


class PhaseClock(L.Callback):
    """Per fit and process: start of the first batch, end of the last, the broadcast bytes, peak RSS."""

    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist

        self.first, self.sent = None, 0
        self.original = dist._broadcast_coalesced

        def counting(group, tensors, *args, **kwargs):
            self.sent += sum(t.numel() * t.element_size() for t in tensors)
            return self.original(group, tensors, *args, **kwargs)

        dist._broadcast_coalesced = counting

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.last = time.perf_counter()

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        dist._broadcast_coalesced = self.original
        line = {"rank": trainer.global_rank, "first": self.first, "last": self.last, "sent": self.sent,
                "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        with open(os.environ[OUT_ENV], "a") as f:
            f.write(json.dumps(line) + "\n")


def run(code: Path, bench: Path, out: Path, args) -> dict:
    clock = out.with_suffix(".jsonl")
    clock.unlink(missing_ok=True)
    overrides = json.dumps({"llm_width": args.width, "llm_layers": args.layers, "llm_mlp": 4 * args.width,
                            "heads": args.width // 64, "kv_heads": args.width // 64})
    cmd = [sys.executable, "-m", "mllm_cl.cli", "fit", "--config", "configs/micro.yaml",
           "--config", "configs/methods/routing.yaml", "--data.benchmark", str(bench),
           "--trainer.default_root_dir", str(out), "--model.steps_per_task", str(args.steps),
           "--model.method.init_args.gate_steps", str(args.steps), "--model.method.init_args.gate_batch", "null",
           "--model.backbone_overrides", overrides, "--data.test_limit", "2",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.callbacks+", "phase_switch.PhaseClock"]
    env = {**os.environ, OUT_ENV: str(clock), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(code), str(Path(__file__).parent)])}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{code}: fit failed\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    fits = [json.loads(line) for line in clock.read_text().splitlines()]
    mine = [f for f in fits if f["rank"] == 0]  # fits in order: task 1 expert, gate, task 2 expert, gate
    switches = [mine[i + 1]["first"] - mine[i]["last"] for i in (0, 2)]
    return {"switch_s": statistics.mean(switches), "sent_mib": [round(f["sent"] / 2**20, 1) for f in mine],
            "maxrss_mib": [round(max(f["maxrss_mib"] for f in fits if f["rank"] == r)) for r in (0, 1)],
            "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="git commit to measure as the reference, in a worktree (default: none)")
    parser.add_argument("--width", type=int, default=1024, help="the random backbone's LLM width (default 1024)")
    parser.add_argument("--layers", type=int, default=8, help="its decoder layers (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="steps of each phase (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench = tmp / "bench"
        subprocess.run([sys.executable, "-m", "mllm_cl.cli", "data", "synth", "--out", str(bench), "--tasks",
                        "color", "count", "--train-size", "16", "--test-size", "2", "--quiet"], cwd=ROOT, check=True)
        rows = {}
        if args.ref:
            tree = tmp / "ref"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.ref], cwd=ROOT, check=True,
                           capture_output=True)
            try:
                rows[f"at {args.ref}"] = run(tree, bench, tmp / "ref-run", args)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
        rows["now"] = run(ROOT, bench, tmp / "now-run", args)
    print(f"routing-CL, 2 gloo processes, random backbone width {args.width} x {args.layers} layers, "
          f"{args.steps} steps per phase")
    print(f"{'code':<16} {'phase switch s':>14} {'broadcast MiB per fit (rank 0)':>34} {'peak RSS MiB r0/r1':>19} "
          f"{'wall s':>7}")
    for name, r in rows.items():
        print(f"{name:<16} {r['switch_s']:>14.2f} {str(r['sent_mib']):>34} "
              f"{'/'.join(map(str, r['maxrss_mib'])):>19} {r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
