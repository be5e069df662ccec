"""PNG plots of one run: the accuracy-matrix heatmap and each task's score across stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mllm_cl.report.summary import matrix_rows  # noqa: E402


def heatmap(results: dict[str, Any], path: Path) -> None:
    rows = matrix_rows(results)
    names = results["order"]
    data = np.array([[np.nan if v is None else v for v in scores] for _, scores in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3, 0.55 * len(rows) + 1.8))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training")
    ax.set_title(f"{results['method']}: accuracy matrix (%)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_task_curves(ax, results: dict[str, Any], markersize: float = 6) -> list[str]:
    """Each task's score after each stage (x = 0 for zero-shot, k after task k) on ``ax``; the stage labels.

    Only evaluated stages get a point. Consecutive stages are joined by a solid line; where the
    stages between two points were not evaluated (a task is scored zero-shot, then first after its
    own training), the join is dashed, so no line claims a score nobody measured.
    """
    rows = matrix_rows(results)
    for j, name in enumerate(results["order"]):
        points = [(x, scores[j]) for x, (_, scores) in enumerate(rows) if scores[j] is not None]
        (marks,) = ax.plot([x for x, _ in points], [y for _, y in points], linestyle="none", marker="o",
                           markersize=markersize, label=name)
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            ax.plot([x0, x1], [y0, y1], color=marks.get_color(), linestyle="-" if x1 - x0 == 1 else "--",
                    linewidth=1.5 if x1 - x0 == 1 else 1.0)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    return [label for label, _ in rows]


def task_curves(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * (len(results["matrix"]) + 1) + 3), 3.8))
    labels = draw_task_curves(ax, results)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(f"{results['method']}: each task across stages")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
