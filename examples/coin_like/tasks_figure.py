"""One test image per task of the CoIN-shaped sequence, with its question's first line and its answer.

    python examples/coin_like/tasks_figure.py [--out docs/figures/coin_like_tasks.png] [--index 3]

Draws the samples with ``mllm_cl.data.synth.sample`` (seed 0, 48-px images, as
configs/experiments/coin_like.yaml), so the figure shows exactly what a run sees.
"""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mllm_cl.data.synth import TASKS, sample  # noqa: E402
from mllm_cl.data.synth_coin import COIN_ORDER  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/figures/coin_like_tasks.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--index", type=int, default=5, help="which test sample of each task to show")
    args = p.parse_args(argv)
    fig, axes = plt.subplots(1, len(COIN_ORDER), figsize=(2.1 * len(COIN_ORDER), 3.0))
    for ax, task in zip(axes, COIN_ORDER, strict=False):
        s = sample(task, "test", args.index)
        ax.imshow(s.image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        question = s.instruction.split("\n")[0]
        if len(question) > 34:
            question = question[:32] + "…"
        ax.set_title(f"{task} ({TASKS[task].domain})", fontsize=9)
        ax.set_xlabel(f"{question}\n→ {s.answer}", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
