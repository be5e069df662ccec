"""Comparing methods over sweeps: one table (mean and spread over task orders and seeds) and two figures.

A sweep is a folder of run directories, one per method (``SWEEP/METHOD/results.json``),
all trained on one task order with one seed and one budget. ``collect`` reads any
number of sweeps and groups runs by their folder's name (the method, in a sweep; an
ablation's name, in a folder of ablations); a row gives each metric's mean over the
sweeps and, with more than one, its range (min–max).

Rows are paired by sweep (task order and seed): a method's *gap to oracle* is its MFN minus
that of ``METHOD_oracle`` on the same sweep (its own run evaluated again with each sample routed
to its task's experts), and its time is divided by ``lora_ft``'s on the same sweep.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from mllm_cl.report.summary import load_results, run_seconds

COLUMNS = ("MFT", "MFN", "MAA", "BWT")
ORACLE_SUFFIX = "_oracle"
KINDS = ("image", "instruction", "answer")  # the routing diagnostic's token kinds


def collect(sweeps: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """run name (its folder's name) -> the results.json of each sweep that holds a finished run of it
    (with ``run_dir``, the folder it was read from, added)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for sweep in sweeps:
        for results_path in sorted(Path(sweep).glob("*/results.json")):
            results = load_results(results_path.parent)
            if results["completed_tasks"] == len(results["tasks"]):
                run = {**results, "run_dir": str(results_path.parent)}
                found.setdefault(results_path.parent.name, []).append(run)
    return found


def _metric(results: dict[str, Any], name: str) -> float | None:
    return (results.get("metrics") or {}).get(name)


def _stored(results: dict[str, Any]) -> int:
    """Stored parameters after the last task."""
    return results["params"]["stored_per_task"][-1]["total"]


def _sweep(results: dict[str, Any]) -> tuple:
    return tuple(results["order"]), results["seed"]


def _paired(runs: list[dict[str, Any]], others: list[dict[str, Any]] | None, value) -> list[float | None]:
    """``value(run, other)`` for each run whose sweep ``others`` has too."""
    by_sweep = {_sweep(o): o for o in others or []}
    return [value(r, by_sweep[_sweep(r)]) for r in runs if _sweep(r) in by_sweep]


def _seconds(results: dict[str, Any]) -> float:
    """A run's training and evaluation time; an evaluated-again run's (``mllm-cl evaluate``) evaluation only."""
    again = results.get("reevaluated")
    return again["eval_s"] if again else run_seconds(results)


def _gap(run: dict[str, Any], oracle: dict[str, Any]) -> float | None:
    a, b = _metric(run, "MFN"), _metric(oracle, "MFN")
    return None if a is None or b is None else a - b


def _cell(values: list[float | None], fmt: str = "{:.1f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    text = fmt.format(mean)
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}–{fmt.format(max(values))})"
    return text.replace("-", "−")  # a minus sign, not a hyphen next to the range's dash


def _scores(values) -> str:
    return " / ".join("–" if v is None else f"{v:.0f}" for v in values)


def retention(results: dict[str, Any]) -> float | None:
    """The general task's retention in % (token-F1 where scored, else its first scorer; the first general task)."""
    by_task = (results.get("general") or {}).get("retention") or {}
    for by_scorer in by_task.values():
        r = by_scorer.get("token_f1", next(iter(by_scorer.values()), None))
        return None if r is None else 100 * r
    return None


def choice(results: dict[str, Any]) -> tuple[str, float] | None:
    """(what chose, accuracy %) of a method that picks a task per sample: the mean over tasks of the last
    stage's ``*_accuracy`` (a locator's, a prior's, a group's)."""
    stages = results.get("method_metrics") or {}
    own = stages[max(stages)] if stages else {}
    for key, by_task in own.items():
        if key.endswith("_accuracy") and isinstance(by_task, dict) and by_task:
            return key[: -len("_accuracy")], statistics.fmean(by_task.values())
    return None


def own_top1(results: dict[str, Any]) -> list[float] | None:
    """Token-level routing: the share (%) of image / instruction / answer tokens whose top-1 expert is their
    task's own, mean over tasks, from the routing diagnostic of the last stage (``RUN/routing/stage_NN.json``)."""
    path = Path(results["run_dir"]) / "routing" / f"stage_{results['completed_tasks']:02d}.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())["summary"]
    return [100 * statistics.fmean(s[k]["own_top1"] for s in summary.values() if k in s) for k in KINDS]


def _routing(name: str, runs: list[dict[str, Any]]) -> str:
    if name.endswith(ORACLE_SUFFIX):
        return "true task"
    chosen = [c for c in map(choice, runs) if c]
    if chosen:
        return f"{chosen[0][0]} {_cell([a for _, a in chosen], '{:.0f}')}"
    shares = [s for s in map(own_top1, runs) if s]
    if shares:
        return "own top-1 " + "/".join(f"{statistics.fmean(s[i] for s in shares):.0f}" for i in range(len(KINDS))) + "%"
    return "–"


def table(found: dict[str, list[dict[str, Any]]], order: list[str] | None = None) -> str:
    """Markdown: one row per method; mean (min–max) over the sweeps."""
    methods = [m for m in (order or []) if m in found] + sorted(m for m in found if m not in (order or []))
    head = ("| method | runs | MFT | MFN | gap to oracle | MAA | BWT | routing | general | right after each task "
            "(first sweep) | final row (first sweep) | stored params | time | ÷ lora_ft |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in methods:
        runs = found[m]
        metrics = {c: _cell([_metric(r, c) for r in runs]) for c in COLUMNS}
        gap = _cell(_paired(runs, found.get(m + ORACLE_SUFFIX), _gap))
        first = runs[0]["matrix"]
        diagonal = "–" if runs[0]["one_row"] else _scores(first[i][i] for i in range(len(first)))
        stored = statistics.fmean(_stored(r) for r in runs)
        seconds = statistics.fmean(_seconds(r) for r in runs)
        ratio = "–" if m.endswith(ORACLE_SUFFIX) else _cell(
            _paired(runs, found.get("lora_ft"), lambda r, o: _seconds(r) / _seconds(o)), "{:.2f}")
        time = f"{seconds:.0f} s" + (" (eval)" if m.endswith(ORACLE_SUFFIX) else "")
        general = _cell([retention(r) for r in runs], "{:.0f}")
        lines.append(f"| {m} | {len(runs)} | {metrics['MFT']} | {metrics['MFN']} | {gap} | {metrics['MAA']} | "
                     f"{metrics['BWT']} | {_routing(m, runs)} | {general if general == '–' else general + '%'} | "
                     f"{diagonal} | {_scores(first[-1])} | {stored / 1000:.1f}k | {time} | {ratio} |")
    return "\n".join(lines)


def figures(found: dict[str, list[dict[str, Any]]], out: Path, title: str = "") -> list[Path]:
    """``mfn_vs_params.png`` (each method's sweeps as points, the mean marked; an oracle row hollow) and
    ``task_curves.png`` (per method, oracle rows left out, each task's score after each stage, first sweep)."""
    from mllm_cl.report.plots import draw_task_curves, plt  # heavy: matplotlib (plots selects the Agg backend)

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (m, runs) in enumerate(sorted(found.items())):
        xs = [_stored(r) / 1000 for r in runs]
        ys = [_metric(r, "MFN") for r in runs]
        pts = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None]
        if not pts:
            continue
        hollow = m.endswith(ORACLE_SUFFIX)  # the same experts as its method: same x, the MFN routing could reach
        colour = cycle[i % len(cycle)]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], alpha=0.45, facecolors="none" if hollow else colour,
                   edgecolors=colour)
        mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
        ax.scatter([mx], [my], marker="D", facecolors="none" if hollow else colour,
                   edgecolors=colour if hollow else "black", linewidths=1.5 if hollow else 1.0)
        ax.annotate(m, (mx, my), textcoords="offset points", xytext=(5, -11) if hollow else (5, 4), fontsize=8)
    ax.set_xlabel("stored parameters after the last task (thousands)")
    ax.set_ylabel("MFN (%)")
    ax.set_title(f"{title + ': ' if title else ''}MFN vs stored parameters (diamond: mean over sweeps; hollow: oracle)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    scatter = out / "mfn_vs_params.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)

    methods = sorted(m for m in found if not m.endswith(ORACLE_SUFFIX))
    cols = 3
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, m in zip(axes.flat, methods, strict=False):
        stages = draw_task_curves(ax, found[m][0], markersize=3)
        ax.set_title(m, fontsize=10)
        ax.set_xticks(range(len(stages)))
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("after task (0: zero-shot)" + (f"; {title}" if title else ""))
    fig.supylabel("score (%)")
    fig.tight_layout()
    curves = out / "task_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [scatter, curves]
