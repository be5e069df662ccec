"""``mllm-cl data``: data subcommands.

``data synth`` writes the synthetic benchmark; ``data shard`` writes
WebDataset tar shards from a JSON file and its images; ``data benchmarks``
prints the built-in benchmark definitions (CoIN, UCIT, MLLM-DCL): task order,
scorers, generation budgets and the file layout, and with ``--root`` checks a
folder against it.
"""

from __future__ import annotations

import argparse
import sys
import time

from mllm_cl.data import benchmarks, synth
from mllm_cl.data.errors import BadSampleError, SkipLog

HELP = "generate the synthetic benchmark (synth), write WebDataset shards (shard), show benchmark layouts (benchmarks)"
QUIET_HELP = ("no progress (without it: one line redrawn on a terminal; in a pipe or a file, a line every "
              "MLLM_CL_PROGRESS_SECONDS seconds, default 30, and one at the end)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    s = sub.add_parser(
        "synth",
        help="write the synthetic benchmark (LLaVA JSON + PNG images + benchmark.json)",
        description="Generate the procedural image-instruction benchmark: one folder per task with "
        "train.json (LLaVA conversations), test.json (test rows), images/, and a benchmark.json manifest. "
        "The same seed gives byte-identical files.",
    )
    s.add_argument("--out",
                   help="output folder (created; existing task folders are overwritten); required unless --list")
    s.add_argument("--tasks", nargs="+", default=None,
                   help="tasks to write, in this order (default: the --suite's tasks; see --list)")
    s.add_argument("--suite", choices=("shapes", "coin"), default=None,
                   help="shapes: the shape-scene tasks (the default); coin: the CoIN-shaped suite, eight tasks over "
                        "six visual domains and their caption task (needs: pip install 'mllm-cl[coin]')")
    s.add_argument("--train-size", type=int, default=300, help="training samples per task (default: %(default)s)")
    s.add_argument("--test-size", type=int, default=100, help="test samples per task (default: %(default)s)")
    s.add_argument("--image-size", type=int, default=48, help="image side in pixels, >= 32 (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed; the same seed gives identical files (default: %(default)s)")
    s.add_argument("--instruction-first", action="store_true",
                   help="put the instruction before the image in every user turn ('{instruction}\\n<image>' instead "
                        "of '<image>\\n{instruction}'), so that under causal attention the image's tokens see the "
                        "instruction (default: off, the image first)")
    s.add_argument("--tint", type=float, default=0.0, metavar="S",
                   help="blend every image of a task, train and test, with that task's own colour (hues evenly "
                        "spaced over the tasks written) with weight S in [0, 1]: (1 - S) * image + S * colour; 1 "
                        "leaves a plain colour and no picture (default: %(default)s, images unchanged)")
    s.add_argument("--list", action="store_true", help="list the tasks with their suite, domain and scorer, and exit")
    s.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    h = sub.add_parser(
        "shard",
        help="write WebDataset tar shards from a LLaVA JSON file and its images",
        description="Write the records of a LLaVA conversation file (or a test file) as WebDataset tar shards: "
        "each record becomes NAME.json (the record without its image path) and NAME.png or NAME.jpg (the image "
        "file's bytes; other formats re-encoded as PNG), NAME being the record's position in the input. Shards "
        "are OUT/STEM-000000.tar, ... after the input's file name, with a shards.json manifest of sample counts. "
        "Every record is checked as training reads it (images must exist and decode). Train from the shards "
        "with `data.shards` in the experiment config.",
    )
    h.add_argument("--input", required=True, metavar="FILE.json",
                   help="a LLaVA conversation JSON (or a test file, JSON list or JSONL)")
    h.add_argument("--image-root", metavar="DIR", default=None,
                   help="folder the records' 'image' paths are relative to (default: the input file's folder)")
    h.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; shards of the same input name in it are replaced)")
    h.add_argument("--shard-size", type=int, default=1000, metavar="N",
                   help="samples per shard (default: %(default)s); use at least as many shards as training "
                   "processes x loader workers so that each shard is read once per epoch")
    h.add_argument("--on-bad-sample", choices=("raise", "skip"), default="raise",
                   help="a bad record (malformed, missing or corrupt image): stop with an error naming file and "
                   "record (raise, the default), or leave it out and count it (skip)")
    h.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    b = sub.add_parser(
        "benchmarks",
        help="show the built-in benchmark definitions and the file layout each expects",
        description="Print a built-in benchmark's task order, scorer per task (official mode), generation budget "
        "and the layout expected under `data.root`; with --root, check that folder against it.",
    )
    b.add_argument("name", nargs="?", default=None, help="coin, ucit or mllm_dcl (default: list them)")
    b.add_argument("--root", metavar="DIR", default=None, help="check this folder against the layout")
    b.add_argument("--path", action="append", default=[], metavar="KEY=VALUE",
                   help="override a folder name of the layout, as data.paths does "
                        "(e.g. instructions=Instructions_Diverse)")


def run(args: argparse.Namespace) -> int:
    if args.data_command is None:
        print("mllm-cl data: choose a subcommand: synth, shard or benchmarks; see --help", file=sys.stderr)
        return 2
    if args.data_command == "shard":
        return _shard(args)
    if args.data_command == "benchmarks":
        return _benchmarks(args)
    return _synth(args)


def _synth(args: argparse.Namespace) -> int:
    if args.list:
        for suite, names in synth.SUITES.items():
            for name in names:
                spec = synth.TASKS[name]
                print(f"{name:<10} suite={suite:<7} domain={spec.domain:<7} scorer={spec.scorer}")
        return 0
    if not args.out:
        print("mllm-cl data synth: --out DIR is required", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        manifest = synth.generate(args.out, tasks=args.tasks, suite=args.suite, train_size=args.train_size,
                                  test_size=args.test_size, image_size=args.image_size, seed=args.seed,
                                  instruction_first=args.instruction_first, tint=args.tint,
                                  progress=not args.quiet)
    except (ValueError, ImportError) as e:
        print(f"mllm-cl data synth: {e}", file=sys.stderr)
        return 2
    names = ", ".join(t["name"] for t in manifest["tasks"])
    print(f"wrote {len(manifest['tasks'])} tasks ({names}) to {args.out} in {time.time() - t0:.1f}s; "
          f"manifest {args.out}/benchmark.json")
    return 0


def _shard(args: argparse.Namespace) -> int:
    from mllm_cl.data.shards import MANIFEST, write_shards  # heavy: torch; `mllm-cl --help` stays fast

    t0 = time.time()
    skips = SkipLog()
    try:
        manifest = write_shards(args.input, args.image_root, args.out, shard_size=args.shard_size,
                                on_bad_sample=args.on_bad_sample, skips=skips, progress=not args.quiet)
    except (BadSampleError, FileNotFoundError, ValueError) as e:
        print(f"mllm-cl data shard: {e}", file=sys.stderr)
        return 1 if isinstance(e, BadSampleError) else 2
    if skips.total:
        print(skips.summary(args.input), file=sys.stderr)
    print(f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shards to {args.out} "
          f"in {time.time() - t0:.1f}s ({skips.total} skipped); manifest {args.out}/{MANIFEST}")
    return 0


def _benchmarks(args: argparse.Namespace) -> int:
    if args.name is None:
        for b in benchmarks.BENCHMARKS.values():
            print(f"{b.name:<9} {b.title}: {' -> '.join(b.task_names)}")
        return 0
    try:
        paths = dict(p.split("=", 1) for p in args.path)
    except ValueError:
        print(f"mllm-cl data benchmarks: --path takes KEY=VALUE, got {args.path}", file=sys.stderr)
        return 2
    try:
        if args.root is None:
            print(benchmarks.describe(args.name))
            return 0
        tasks = benchmarks.resolve(args.name, args.root, paths=paths or None)
    except benchmarks.BenchmarkLayoutError as e:
        print(f"mllm-cl data benchmarks: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"mllm-cl data benchmarks: {e}", file=sys.stderr)
        return 2
    print(f"{args.root}: every file of the {len(tasks)} tasks is in place")
    for t in tasks:
        print(f"  {t.name:<15} train {t.train}\n  {'':<15} test  {t.test}")
    return 0
