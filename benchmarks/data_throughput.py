"""Data throughput: what the loaders feed vs what a training step consumes.

One run, interleaved rounds (these 2-core machines are noisy): each round
reads one full epoch through each loader variant (worker start-up included,
as every epoch pays it) and times training steps. The variants:

- the shard reader alone: ``ShardDataset`` without an encoder through
  ``EpochDataLoader`` (tar reading, the rank x worker split, the shuffle
  buffer, the JSON records parsed; images left undecoded), 0 and 2 workers;
- the training loaders of ``TaskSequence``, from JSON + image files and from
  the shards, 0 and 2 workers: samples fully prepared (decoded, padded,
  normalized, tokenized, collated), exactly what the training step receives;
- training steps (forward + backward + AdamW) of the canonical synthetic
  experiment: the packaged tiny base with lora_ft's adapters (rank 8 on
  q/v/up/down), batch 32, 48-pixel images, template ``short``, max_length
  128, with 1 and with ``--threads`` torch threads; the faster is the tiny
  model's consumption rate (on a shared machine two threads can be the slower).

Every loader is held against two consumption rates: the tiny model's step,
measured here, and a 7B step, ``--train-samples-per-s``: by default an
*estimate* for LLaVA-1.5-7B on one 80 GB GPU, batch 16 per GPU at about 1.5 s
per step (10.7 samples/s; no 7B step has been measured yet). Each GPU process
has its own loader, so the 7B ratio is per process. Target: every loader >= 5x
both. Medians with the 10-90% spread.

The shards are written to a temporary folder as ``mllm-cl data synth --tasks
color --train-size SAMPLES`` and ``mllm-cl data shard --shard-size SHARD_SIZE``
would write them; ``--shards`` times the reader over shards already written
instead (a folder, a ``.tar`` file or a glob; the other variants need the
synthetic data and are left out).

    python benchmarks/data_throughput.py [--samples 1024] [--rounds 5] [--steps 3] [--threads 2]
    python benchmarks/data_throughput.py --reader-only [--shards DIR] [--train-samples-per-s 10.7]

The loaders and the training step are timed one after the other, not together:
on 2 cores, loader workers and training compete for the same CPUs in a real run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, quantile  # noqa: E402

from mllm_cl.data import synth  # noqa: E402
from mllm_cl.data.shards import EpochDataLoader, ShardDataset, shard_list, write_shards  # noqa: E402

#: LLaVA-1.5-7B on one 80 GB GPU: batch 16 per GPU at about 1.5 s per step (an estimate, not a measurement).
TRAIN_SAMPLES_PER_S = 16 / 1.5
TARGET = 5.0


def reader_variants(source: str, workers: tuple[int, ...], batch: int, threads: int,
                    shuffle_buffer: int) -> dict[str, Callable[[], int]]:
    """One epoch of the shard reader per call, for each worker count; each returns the samples read."""
    variants = {}
    for n in workers:
        data = ShardDataset(source, shuffle=True, shuffle_buffer=shuffle_buffer, seed=0)
        loader = EpochDataLoader(data, batch_size=batch, num_workers=n, collate_fn=list)

        def epoch(loader=loader) -> int:
            torch.set_num_threads(threads)  # a 0-worker loader runs in the training process
            return sum(len(b) for b in loader)

        variants[f"shard reader, {n} workers"] = epoch
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024, help="training samples per epoch (synthetic data)")
    ap.add_argument("--shard-size", type=int, default=128, help="samples per shard (synthetic data)")
    ap.add_argument("--shards", default=None,
                    help="time the shard reader over these shards (a folder, a .tar file or a glob) instead of "
                         "synthetic ones; implies --reader-only")
    ap.add_argument("--reader-only", action="store_true",
                    help="time the shard reader only (no JSON loaders, prepared samples or training steps)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each reads one epoch per loader variant)")
    ap.add_argument("--steps", type=int, default=3, help="training steps timed per round (per thread count)")
    ap.add_argument("--batch", type=int, default=32, help="samples per batch")
    ap.add_argument("--shuffle-buffer", type=int, default=1000,
                    help="the reader's shuffle buffer (samples per worker; data.shuffle_buffer's default)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the training step (also 1)")
    ap.add_argument("--train-samples-per-s", type=float, default=TRAIN_SAMPLES_PER_S,
                    help=f"what a 7B training step consumes per GPU process, samples/s (default: "
                         f"{TRAIN_SAMPLES_PER_S:.1f}, an estimate for LLaVA-1.5-7B on one 80 GB GPU: batch 16 "
                         "at about 1.5 s per step; give a measured rate when there is one)")
    args = ap.parse_args()
    reader_only = args.reader_only or args.shards is not None
    estimated = args.train_samples_per_s == TRAIN_SAMPLES_PER_S

    tmp = Path(tempfile.mkdtemp(prefix="mllm-cl-throughput-"))
    if args.shards is None:
        synth.generate(tmp / "synth", tasks=["color"], train_size=args.samples, test_size=1, image_size=48, seed=0,
                       progress=False)
        write_shards(tmp / "synth/color/train.json", tmp / "synth/color", tmp / "shards/color",
                     shard_size=args.shard_size, progress=False)
    source = args.shards if args.shards is not None else str(tmp / "shards/color")
    files = shard_list(source)
    counts = [f.samples for f in files]
    described = (f"{sum(counts)} samples/epoch in {len(files)} shards" if None not in counts
                 else f"{len(files)} shards without a manifest")

    samples: dict[str, int] = {}  # samples per call, by variant
    variants: dict[str, Callable[[], None]] = {}
    for name, epoch in reader_variants(source, (0, 2), args.batch, args.threads, args.shuffle_buffer).items():
        samples[name] = epoch()  # also the first (warm-up) pass

        def run(epoch=epoch, expected=samples[name]) -> None:
            n = epoch()
            assert n == expected, (n, expected)

        variants[name] = run
    if len(set(samples.values())) != 1:
        raise SystemExit(f"the reader variants read different sample counts: {samples}")

    steps: dict[str, int] = {}
    if not reader_only:
        from mllm_cl.data_modules import TaskSequence

        from mllm_cl.experts import ExpertSetup
        from mllm_cl.methods import LoRAFineTune
        from mllm_cl.system.module import ContinualMLLM

        module = ContinualMLLM(LoRAFineTune(ExpertSetup(["q_proj", "v_proj", "up_proj", "down_proj"], rank=8)),
                               backbone="tiny-base")
        module.method.on_task_start(module.model, 0)
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)

        def datamodule(shards: bool, workers: int) -> TaskSequence:
            dm = TaskSequence(benchmark=str(tmp / "synth"), template="short", max_length=128, batch_size=args.batch,
                              num_workers=workers, shards=str(tmp / "shards") if shards else None,
                              shuffle_buffer=args.shuffle_buffer)
            dm.connect(module.tokenizer, module.image_processor(), module.model.num_image_tokens)
            return dm

        loaders = {}
        for label, shards in (("JSON + images", False), ("shards, prepared", True)):
            for workers in (0, 2):
                name = f"{label}, {workers} workers"
                loaders[name] = datamodule(shards, workers).train_dataloader()

                def prepared_epoch(loader=loaders[name]) -> None:
                    torch.set_num_threads(args.threads)
                    n = sum(len(batch["ids"]) for batch in loader)
                    assert n == args.samples, n

                variants[name] = prepared_epoch
                samples[name] = args.samples

        batch = next(iter(loaders["JSON + images, 0 workers"]))
        module.model.train()

        def train_steps(threads: int) -> None:
            torch.set_num_threads(threads)
            for _ in range(args.steps):
                lm_loss, extra = module.forward_batch(batch, training=True)
                loss = lm_loss if extra is None else lm_loss + extra
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        steps = {f"training step, {n} thread{'s' * (n > 1)}": n for n in dict.fromkeys([1, args.threads])}
        for name, n in steps.items():
            variants[name] = lambda n=n: train_steps(n)
            samples[name] = args.steps * args.batch
    times = interleaved(variants, rounds=args.rounds, warmup=1)

    def rate(name: str) -> tuple[float, float, float]:
        r = [samples[name] / t for t in times[name]]
        return statistics.median(r), quantile(r, 0.1), quantile(r, 0.9)

    seven_b = args.train_samples_per_s
    origin = source if args.shards is not None else "synthetic, 48 px"
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.rounds} rounds; {described} ({origin}); "
          f"batch {args.batch}, shuffle buffer {args.shuffle_buffer}")
    tiny = 0.0
    for name in steps:
        med, lo, hi = rate(name)
        tiny = max(tiny, med)
        print(f"{name + ' (tiny-base + lora_ft)':<46} {med:8.0f} samples/s   p10-p90 {lo:6.0f}-{hi:<6.0f}  "
              f"({statistics.median(times[name]) / args.steps * 1e3:.0f} ms/step)")
    print(f"{'training step, LLaVA-1.5-7B, 1 GPU':<46} {seven_b:8.1f} samples/s   "
          f"{'(estimate: batch 16 at ~1.5 s/step)' if estimated else '(given)'}")
    worst = None
    for name in variants:
        if name in steps:
            continue
        med, lo, hi = rate(name)
        ratios = [med / seven_b] + ([med / tiny] if tiny else [])
        worst = min([worst, *ratios]) if worst is not None else min(ratios)
        against_tiny = f"   {med / tiny:5.1f}x tiny step" if tiny else ""
        print(f"{'loader: ' + name:<46} {med:8.0f} samples/s   p10-p90 {lo:6.0f}-{hi:<6.0f}  "
              f"{med / seven_b:6.0f}x 7B step{against_tiny}")
    print(f"target: every loader >= {TARGET:.0f}x the training rate{'s' if tiny else ''} -> "
          f"{'met' if worst >= TARGET else 'NOT met'} (lowest {worst:.1f}x)")


if __name__ == "__main__":
    main()
