"""Comparing methods over sweeps: one table (mean and spread over task orders and seeds) and two figures.

A sweep is a folder of run directories, one per method (``SWEEP/METHOD/results.json``),
all trained on one task order with one seed and one budget. ``collect`` reads any
number of sweeps and groups runs by their folder's name (the method, in a sweep; an
ablation's name, in a folder of ablations); a row gives each metric's mean over the
sweeps and, with more than one, its range (min–max).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mllm_cl.report.summary import load_results, run_seconds

COLUMNS = ("MFT", "MFN", "MAA", "BWT")


def collect(sweeps: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """run name (its folder's name) -> the results.json of each sweep that holds a finished run of it."""
    found: dict[str, list[dict[str, Any]]] = {}
    for sweep in sweeps:
        for results_path in sorted(Path(sweep).glob("*/results.json")):
            results = load_results(results_path.parent)
            if results["completed_tasks"] == len(results["tasks"]):
                found.setdefault(results_path.parent.name, []).append(results)
    return found


def _metric(results: dict[str, Any], name: str) -> float | None:
    return (results.get("metrics") or {}).get(name)


def _stored(results: dict[str, Any]) -> int:
    """Stored parameters after the last task."""
    return results["params"]["stored_per_task"][-1]["total"]


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    text = f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({min(values):.1f}–{max(values):.1f})"
    return text.replace("-", "−")  # a minus sign, not a hyphen next to the range's dash


def _scores(values) -> str:
    return " / ".join("–" if v is None else f"{v:.0f}" for v in values)


def table(found: dict[str, list[dict[str, Any]]], order: list[str] | None = None) -> str:
    """Markdown: one row per method; mean (min–max) over the sweeps."""
    methods = [m for m in (order or []) if m in found] + sorted(m for m in found if m not in (order or []))
    head = ("| method | runs | " + " | ".join(COLUMNS)
            + " | right after each task (first sweep) | final row (first sweep) | stored params | train + eval time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in methods:
        runs = found[m]
        metrics = [[_metric(r, c) for r in runs] for c in COLUMNS]
        first = runs[0]["matrix"]
        diagonal = "–" if runs[0]["one_row"] else _scores(first[i][i] for i in range(len(first)))
        stored = statistics.fmean(_stored(r) for r in runs)
        time = statistics.fmean(run_seconds(r) for r in runs)
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(_cell(v) for v in metrics)
                     + f" | {diagonal} | {_scores(first[-1])} | {stored / 1000:.1f}k | {time:.0f} s |")
    return "\n".join(lines)


def figures(found: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """``mfn_vs_params.png`` (each method's sweeps as points, the mean marked) and ``task_curves.png``
    (per method, each task's score after each stage, from the first sweep)."""
    from mllm_cl.report.plots import draw_task_curves, plt  # plots selects the Agg backend first

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, runs in sorted(found.items()):
        xs = [_stored(r) / 1000 for r in runs]
        ys = [_metric(r, "MFN") for r in runs]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        line = ax.scatter([x for x, _ in pts], [y for _, y in pts], alpha=0.45)
        mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
        ax.scatter([mx], [my], marker="D", color=line.get_facecolor()[0], edgecolor="black")
        ax.annotate(m, (mx, my), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("stored parameters after the last task (thousands)")
    ax.set_ylabel("MFN (%)")
    ax.set_title("MFN vs stored parameters (diamond: mean over sweeps)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    scatter = out / "mfn_vs_params.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)

    methods = sorted(found)
    cols = 3
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, m in zip(axes.flat, methods):
        stages = draw_task_curves(ax, found[m][0], markersize=3)
        ax.set_title(m, fontsize=10)
        ax.set_xticks(range(len(stages)))
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("after task (0: zero-shot)")
    fig.supylabel("score (%)")
    fig.tight_layout()
    curves = out / "task_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [scatter, curves]
