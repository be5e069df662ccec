"""Data throughput: what the loaders feed vs what a training step on the tiny model consumes.

One run, interleaved rounds (these 2-core machines are noisy): each round
reads one full epoch through each loader variant (JSON + image files, and
WebDataset shards, with 0 and 2 DataLoader workers; worker start-up included,
as every epoch pays it) and times training steps (forward + backward + AdamW)
of the canonical synthetic experiment: the packaged tiny base with lora_ft's
adapters (rank 8 on q/v/up/down), batch 32, 48-pixel images, template
``short``, max_length 128, with 1 and with ``--threads`` torch threads; the
faster is the consumption rate the loaders are held against (on a shared
machine two threads can be the slower). Samples are fully prepared (decoded,
padded, normalized, tokenized, collated), exactly what the training step
receives. Medians with the 10-90% spread; target: every loader >= 5x the
training rate.

    python benchmarks/data_throughput.py [--samples 1024] [--rounds 5] [--steps 3] [--threads 2]

The loaders and the training step are timed one after the other, not together:
on 2 cores, loader workers and training compete for the same CPUs in a real run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, quantile  # noqa: E402

from mllm_cl.data_modules import TaskSequence  # noqa: E402
from mllm_cl.data import synth  # noqa: E402
from mllm_cl.data.shards import write_shards  # noqa: E402
from mllm_cl.experts import ExpertSetup  # noqa: E402
from mllm_cl.methods import LoRAFineTune  # noqa: E402
from mllm_cl.system.module import ContinualMLLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024, help="training samples per epoch")
    ap.add_argument("--shard-size", type=int, default=128, help="samples per shard")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each reads one epoch per loader variant)")
    ap.add_argument("--steps", type=int, default=3, help="training steps timed per round (per thread count)")
    ap.add_argument("--batch", type=int, default=32, help="samples per batch")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the training step (also 1)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mllm-cl-throughput-"))
    synth.generate(tmp / "synth", tasks=["color"], train_size=args.samples, test_size=1, image_size=48, seed=0,
                   progress=False)
    manifest = write_shards(tmp / "synth/color/train.json", tmp / "synth/color", tmp / "shards/color",
                            shard_size=args.shard_size, progress=False)

    module = ContinualMLLM(LoRAFineTune(ExpertSetup(["q_proj", "v_proj", "up_proj", "down_proj"], rank=8)),
                           backbone="tiny-base")
    module.method.on_task_start(module.model, 0)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)

    def datamodule(shards: bool, workers: int) -> TaskSequence:
        dm = TaskSequence(benchmark=str(tmp / "synth"), template="short", max_length=128, batch_size=args.batch,
                          num_workers=workers, shards=str(tmp / "shards") if shards else None)
        dm.connect(module.tokenizer, module.image_processor(), module.model.num_image_tokens)
        return dm

    variants, loaders = {}, {}
    for label, shards in (("JSON + images", False), ("shards", True)):
        for workers in (0, 2):
            name = f"{label}, {workers} workers"
            loaders[name] = datamodule(shards, workers).train_dataloader()

            def epoch(loader=loaders[name]) -> None:
                torch.set_num_threads(args.threads)  # a 0-worker loader runs in the training process
                n = sum(len(batch["ids"]) for batch in loader)
                assert n == args.samples, n

            variants[name] = epoch

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
    times = interleaved(variants, rounds=args.rounds, warmup=1)

    def rate(name: str, samples: int) -> tuple[float, float, float]:
        r = [samples / t for t in times[name]]
        return statistics.median(r), quantile(r, 0.1), quantile(r, 0.9)

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.rounds} rounds; {args.samples} samples/epoch "
          f"({len(manifest['shards'])} shards of {args.shard_size}), batch {args.batch}, 48 px, max_length 128")
    train = 0.0
    for name in steps:
        med, lo, hi = rate(name, args.steps * args.batch)
        train = max(train, med)
        print(f"{name + ' (tiny-base + lora_ft)':<44} {med:8.0f} samples/s   p10-p90 {lo:.0f}-{hi:.0f}   "
              f"({statistics.median(times[name]) / args.steps * 1e3:.0f} ms/step)")
    worst = None
    for name in loaders:
        med, lo, hi = rate(name, args.samples)
        worst = med / train if worst is None else min(worst, med / train)
        print(f"{'loader: ' + name:<44} {med:8.0f} samples/s   p10-p90 {lo:.0f}-{hi:.0f}   {med / train:5.1f}x training")
    print(f"target: every loader >= 5x the faster training step -> {'met' if worst >= 5 else 'NOT met'} "
          f"(lowest {worst:.1f}x)")


if __name__ == "__main__":
    main()
