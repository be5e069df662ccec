"""Chance per task of a benchmark: the best constant answer on each test set, under the task's scorer.

    python benchmarks/chance.py data/coin                # the CoIN-shaped suite (clean mode, as coin_like.yaml)
    python benchmarks/chance.py data/synth --mode official

Prints one line per task: the scorer, the best constant answer and its score,
and the score a method must reach to count as having learned the task
(chance + 30 points).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mllm_cl.data.formats import read_records
from mllm_cl.data.tasks import load_manifest
from mllm_cl.eval.chance import best_constant
from mllm_cl.eval.rules import RULES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", help="a folder with benchmark.json (written by `mllm-cl data synth`)")
    p.add_argument("--mode", choices=("official", "clean"), default="clean", help="scorer mode (default: clean)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    args = p.parse_args(argv)
    table = {}
    print(f"{'task':<12} {'scorer':<16} {'best constant':<26} {'chance':>7} {'bar':>6}")
    for task in load_manifest(args.benchmark):
        if task.scorer not in RULES:  # a caption task: scored per corpus, no constant answer to speak of
            print(f"{task.name:<12} {task.scorer:<16} (a caption task: no per-answer chance)")
            continue
        answer, score = best_constant(read_records(task.test), task.scorer, mode=args.mode)
        table[task.name] = {"scorer": task.scorer, "answer": answer, "chance": score, "bar": round(score + 30, 2)}
        print(f"{task.name:<12} {task.scorer:<16} {answer!r:<26} {score:7.1f} {score + 30:6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": args.mode, "tasks": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
