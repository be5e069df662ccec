"""Loader throughput at LLaVA-1.5's geometry: what the training loader feeds against what a 7B step consumes.

Writes ``--samples`` 640x480 JPEGs (smooth colour fields with shapes and
noise, ~photo-sized files) and a CoIN-like training file (one image and one
short question per sample), then reads the training loader of a
``TaskSequence`` (template ``vicuna_v1``, images padded and resized to
``--image-size`` px, 576 image tokens per sample at 336 px, byte-level
tokenizer) with 0 workers (the reference: samples made in the training
process) and with each ``--workers`` count, ``--pin-memory`` as given (``auto``:
with CUDA). Rounds are interleaved (these machines are noisy); each round reads
one epoch per variant through the task's loader, kept with its workers as the
phases of a task keep it, so worker start-up is reported apart (first epoch
minus the median one).

The consumption rate is a 7B training step's samples per second on one GPU:
``--step-s-per-sample``, by default *estimated* with the model of
``benchmarks/gpu_rehearsal.py``'s ETA (6 x 6.74e9 language-model parameters
x 790 tokens per sample / 350e12 FLOP/s sustained on one H100, about 0.091 s
per sample); no 7B step has been measured yet (``docs/results.md``). Each GPU
process has its own loader, so the ratio is per process.

    python benchmarks/loader_throughput.py [--samples 256] [--workers 2 4] [--rounds 3] [--out FILE.json]

With 0 workers the loading adds to every step; with workers it overlaps the
step as long as the workers have CPUs of their own (on a 2-core machine they
compete with the training process and with each other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _timing import interleaved, quantile  # noqa: E402
from mllm_cl.data_modules import TaskSequence  # noqa: E402

from mllm_cl.backbones.tokenizer import byte_tokenizer  # noqa: E402
from mllm_cl.backbones.vision import CLIP_MEAN, CLIP_STD  # noqa: E402
from mllm_cl.data.images import ImageProcessor  # noqa: E402
from mllm_cl.data.loaders import usable_cpus  # noqa: E402
from mllm_cl.data.tasks import TaskSpec  # noqa: E402

#: LLaVA-1.5-7B's language model (Vicuna-7B): decoder layers and the embedding and output matrices.
LLM_PARAMS = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 2 * 32064 * 4096
TOKENS_PER_SAMPLE = 790  # 576 image tokens and the conversation (gpu_rehearsal.py's ETA)
H100_FLOPS = 350e12  # sustained bf16 throughput of a checkpointed step (gpu_rehearsal.py's ETA)
STEP_S_PER_SAMPLE = 6 * LLM_PARAMS * TOKENS_PER_SAMPLE / H100_FLOPS

QUESTIONS = ["What is the color of the largest object? Answer the question using a single word or phrase.",
             "How many shapes are in the image? Answer the question using a single word or phrase.",
             ("Is there a circle in the picture?\nA. yes\nB. no\nAnswer with the option's letter from the given "
              "choices directly."),
             "What is written on the sign? Answer the question using a single word or phrase."]
ANSWERS = ["red", "3", "A", "exit"]


def write_images(folder: Path, n: int, width: int, height: int, seed: int) -> int:
    """``n`` JPEGs of ``width`` x ``height``: a smooth random colour field, a few shapes, mild noise. Bytes written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        image = coarse.resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 80))
            w, h = int(rng.integers(30, 200)), int(rng.integers(30, 200))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
        pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total


def write_task(root: Path, n: int) -> TaskSpec:
    """A CoIN-like task over the images under ``root/images``: training conversations and one test row."""
    train = [{"id": f"sample-{i}", "image": f"images/{i:06d}.jpg",
              "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                                {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]} for i in range(n)]
    test = [{"question_id": 0, "image": "images/000000.jpg", "text": QUESTIONS[0], "answer": ANSWERS[0]}]
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    return TaskSpec("coin_like", str(root / "train.json"), str(root / "test.json"), str(root))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="training samples (one JPEG each) per epoch")
    ap.add_argument("--width", type=int, default=640, help="JPEG width")
    ap.add_argument("--height", type=int, default=480, help="JPEG height")
    ap.add_argument("--image-size", type=int, default=336, help="the vision tower's input size (px)")
    ap.add_argument("--patch", type=int, default=14,
                    help="the vision tower's patch size (image tokens: (size / patch)^2)")
    ap.add_argument("--batch", type=int, default=16, help="samples per batch")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to compare with 0")
    ap.add_argument("--pin-memory", choices=["auto", "true", "false"], default="auto",
                    help="pin batches for the runs with workers (auto: with CUDA)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each reads one epoch per variant)")
    ap.add_argument("--step-s-per-sample", type=float, default=None,
                    help=f"seconds a 7B training step takes per sample on one GPU (default: the estimate "
                         f"{STEP_S_PER_SAMPLE:.4f}; give a measured one when there is)")
    ap.add_argument("--out", type=Path, default=None, help="also write the measurements as JSON here")
    args = ap.parse_args()
    if any(w < 1 for w in args.workers):
        ap.error("--workers: counts >= 1 (0 workers is the reference, always measured)")
    measured_step = args.step_s_per_sample is not None
    step_s = args.step_s_per_sample if measured_step else STEP_S_PER_SAMPLE
    pin = {"auto": "auto", "true": True, "false": False}[args.pin_memory]

    tmp = Path(tempfile.mkdtemp(prefix="mllm-cl-loader-"))
    t0 = time.perf_counter()
    size = write_images(tmp / "images", args.samples, args.width, args.height, seed=0)
    task = write_task(tmp, args.samples)
    write_s = time.perf_counter() - t0
    tokenizer = byte_tokenizer()
    images = ImageProcessor(args.image_size, CLIP_MEAN, CLIP_STD)
    image_tokens = (args.image_size // args.patch) ** 2

    # The cost of one image in the training process: decode, pad to square, resize, normalize.
    paths = sorted((tmp / "images").glob("*.jpg"))[:32]
    t0 = time.perf_counter()
    for p in paths:
        images.load(p)
    image_ms = (time.perf_counter() - t0) / len(paths) * 1e3

    loaders, firsts = {}, {}
    for workers in [0, *args.workers]:
        dm = TaskSequence([task], template="vicuna_v1", max_length=2048, batch_size=args.batch,
                          num_workers=workers, pin_memory=pin if workers else False, seed=0)
        dm.connect(tokenizer, images, image_tokens)
        dm.set_task(0)
        name = f"{workers} workers" + (", pinned" if workers and dm.pin_memory else "")
        loaders[name] = dm.train_dataloader()  # kept with its workers from epoch to epoch

    def epoch(name: str) -> None:
        n = 0
        for batch in loaders[name]:
            n += batch["input_ids"].shape[0]
        assert n == args.samples, (name, n)

    for name in loaders:  # the first epoch: worker start-up included
        t0 = time.perf_counter()
        epoch(name)
        firsts[name] = time.perf_counter() - t0
    times = interleaved({name: (lambda name=name: epoch(name)) for name in loaders}, rounds=args.rounds, warmup=0)

    consume = 1 / step_s
    cuda = "yes" if torch.cuda.is_available() else "no"
    print(f"torch {torch.__version__}, {usable_cpus()} usable CPUs, CUDA {cuda}; "
          f"{args.samples} JPEGs {args.width}x{args.height} ({size / args.samples / 1024:.0f} KiB each, written in "
          f"{write_s:.1f} s) -> {args.image_size} px, {image_tokens} image tokens; batch {args.batch}; "
          f"{args.rounds} rounds")
    print(f"one image in the training process (decode, pad, resize, normalize): {image_ms:.1f} ms")
    print(f"7B training step: {step_s * 1e3:.0f} ms per sample = {consume:.1f} samples/s per GPU "
          f"({'given' if measured_step else 'ESTIMATED: gpu_rehearsal.py ETA model, 6 x 6.74e9 x 790 / 350 TFLOP/s'})")
    print()
    print(f"{'loader':<22} {'samples/s':>10} {'p10-p90':>13} {'x 0 workers':>12} {'x 7B step':>10} "
          f"{'start-up':>9}")
    ref = [args.samples / t for t in times["0 workers"]]
    rows = []
    for name in loaders:
        rates = [args.samples / t for t in times[name]]
        med = statistics.median(rates)
        speedup = statistics.median([a / b for a, b in zip(rates, ref, strict=False)])
        startup = max(0.0, firsts[name] - statistics.median(times[name]))
        rows.append({"loader": name, "samples_per_s": med, "p10": quantile(rates, 0.1), "p90": quantile(rates, 0.9),
                     "x_no_workers": speedup, "x_step": med / consume, "startup_s": startup})
        print(f"{name:<22} {med:10.1f} {quantile(rates, 0.1):6.1f}-{quantile(rates, 0.9):<6.1f} {speedup:12.2f} "
              f"{med / consume:10.1f} {startup:8.2f}s")
    no_workers = rows[0]["samples_per_s"]
    print()
    print(f"0 workers: loading adds {1 / no_workers * 1e3:.0f} ms per sample to the step's {step_s * 1e3:.0f} ms "
          f"(the step {100 / no_workers / step_s:.0f}% slower, {args.batch / no_workers:.2f} s per batch of "
          f"{args.batch})")
    for row in rows[1:]:
        verdict = "the GPU need not wait" if row["x_step"] >= 1 else "the GPU waits for data"
        print(f"{row['loader']}: {row['x_step']:.1f}x what the step consumes, overlapped with it: {verdict} "
              f"(given CPUs of their own)")
    if usable_cpus() <= max(args.workers):
        print(f"note: {usable_cpus()} usable CPUs here: workers share them with each other and the main process")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": usable_cpus(),
                        "cuda": torch.cuda.is_available()},
            "setup": {"samples": args.samples, "width": args.width, "height": args.height,
                      "image_size": args.image_size, "image_tokens": image_tokens, "batch": args.batch,
                      "rounds": args.rounds, "kib_per_image": size / args.samples / 1024},
            "image_ms": image_ms, "step_s_per_sample": step_s, "step_estimated": not measured_step,
            "loaders": rows, "epoch_s": times}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
