"""Reading results.json and turning it into table rows, report.md and a CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mllm_cl.system.run_dir import SCHEMA_VERSION

METRICS = ("MFT", "MFN", "MAA", "BWT", "forgetting", "FWT")
#: Columns a table shows only where some run has something in them (bad input skipped).
OPTIONAL = ("train skipped", "test skipped")


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a finished or started mllm-cl run directory")
    results = json.loads(path.read_text())
    if results.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {results.get('schema_version')!r}, "
                         f"this mllm-cl reads {SCHEMA_VERSION}")
    return results


def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def run_seconds(results: dict[str, Any]) -> float:
    """Training and evaluation time of a run (zero-shot row, every phase, every stage's evaluation)."""
    timings = results["timings"]
    return (timings.get("zero_shot_eval_s") or 0) + sum(sum(t["phases"].values()) + t["eval_s"]
                                                         for t in timings["tasks"])


def skipped_counts(results: dict[str, Any]) -> tuple[int, int, int]:
    """(training samples skipped over all tasks, test rows skipped and scored at the last evaluated
    stage, summed over its tasks); zeros for runs without ``bad_samples`` (older results.json)."""
    bad = results.get("bad_samples") or {}
    train = sum(t["skipped"] for t in bad.get("train", {}).values())
    stages = bad.get("eval", {})
    last = stages[max(stages)] if stages else {}
    return train, sum(t["skipped"] for t in last.values()), sum(t["scored"] for t in last.values())


def row(run_dir: str | Path, results: dict[str, Any]) -> dict[str, str]:
    """One table row of a run."""
    metrics = results.get("metrics") or {}
    trainable = [p["total"] for p in results["params"]["trainable_per_task"]]
    stored = results["params"]["stored_per_task"]
    modes = sorted({t["mode"] for t in results["tasks"]})
    done = results["completed_tasks"]
    train_skipped, test_skipped, scored = skipped_counts(results)
    return {
        "run": Path(run_dir).name,
        "method": results["method"],
        **{m: _fmt(metrics.get(m)) for m in METRICS if m != "FWT"},
        "trainable/task": _count(sum(trainable) / len(trainable) if trainable else None),
        "stored": _count(stored[-1]["total"] if stored else None),
        "time": f"{run_seconds(results):.0f}s",
        "retention": retention_text(results),
        "mode": ",".join(modes),
        "tasks": f"{done}/{len(results['tasks'])}",
        "train skipped": str(train_skipped) if train_skipped else "",
        "test skipped": f"{test_skipped} of {test_skipped + scored}" if test_skipped else "",
    }


def retention_text(results: dict[str, Any]) -> str:
    """General tasks' retention (last score / zero-shot score) per task and scorer, e.g. ``caption token_f1 96%``."""
    retention = (results.get("general") or {}).get("retention") or {}
    parts = [f"{task} {scorer} {_fmt(None if r is None else 100 * r, 0)}%" for task, by in retention.items()
             for scorer, r in by.items()]
    return ", ".join(parts) or "–"


def table(rows: list[dict[str, str]]) -> str:
    """A plain-text table with aligned columns."""
    if not rows:
        return ""
    cols = [c for c in rows[0] if c not in OPTIONAL or any(r[c] for r in rows)]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def matrix_rows(results: dict[str, Any]) -> list[tuple[str, list[float | None]]]:
    """(label, scores) for the zero-shot row and the row after each task."""
    names = results["order"]
    rows = [("zero-shot", results["zero_shot"] or [None] * len(names))]
    rows += [(f"after {i + 1}: {name}", r) for i, (name, r) in enumerate(zip(names, results["matrix"], strict=False))]
    return rows


def write_csv(results: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", *results["order"]])
        for label, scores in matrix_rows(results):
            w.writerow([label, *("" if s is None else f"{s:.2f}" for s in scores)])


def markdown(run_dir: Path, results: dict[str, Any]) -> str:
    names = results["order"]
    r = row(run_dir, results)
    lines = [f"# {results['method']} on {results['experiment']} (seed {results['seed']})", "",
             f"Run directory: `{run_dir}`; tasks finished: {r['tasks']}; scorer mode: {r['mode']}.", "",
             "## Accuracy matrix (%)", "",
             "| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(_fmt(s) for s in scores) + " |" for label, scores in matrix_rows(results)]
    metrics = results.get("metrics") or {}
    lines += ["", "## Metrics", "", "| " + " | ".join(METRICS) + " |", "|" + "---|" * len(METRICS),
              "| " + " | ".join(_fmt(metrics.get(m)) for m in METRICS) + " |", ""]
    if results.get("locator_accuracy"):
        lines += ["Task-locator accuracy: " + ", ".join(f"{n} {_fmt(a)}" for n, a in
                                                        zip(names, results["locator_accuracy"], strict=False)), ""]
    lines += general_markdown(results)
    lines += method_metrics_markdown(results)
    lines += _bad_samples_section(results)
    lines += ["## Parameters and time per task", "", "| task | trainable | stored | train s | eval s |",
              "|---|---|---|---|---|"]
    for i, name in enumerate(names[: results["completed_tasks"]]):
        t = results["timings"]["tasks"][i]
        lines.append(f"| {name} | {_count(results['params']['trainable_per_task'][i]['total'])} | "
                     f"{_count(results['params']['stored_per_task'][i]['total'])} | "
                     f"{sum(t['phases'].values()):.1f} | {t['eval_s']:.1f} |")
    lines += ["", "![accuracy matrix](plots/accuracy_matrix.png)", "", "![task curves](plots/task_curves.png)", ""]
    return "\n".join(lines)


def method_metrics_markdown(results: dict[str, Any]) -> list[str]:
    """The method's own numbers of the last evaluated stage (a locator's or a prior's accuracy,
    groups, own-slot weights) as a table over tasks, and each confusion matrix (true task x chosen)."""
    stages = results.get("method_metrics") or {}
    if not stages:
        return []
    last = max(stages)
    own = stages[last]
    names = results["order"]
    per_task = {k: v for k, v in own.items() if isinstance(v, dict) and v
                and all(isinstance(x, (int, float)) for x in v.values())}
    confusions = {k: v for k, v in own.items() if isinstance(v, dict) and v
                  and all(isinstance(x, dict) for x in v.values())}
    lines = [f"## Routing at {last.replace('_', ' ')}", ""]
    if per_task:
        lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {k} | " + " | ".join(_fmt(v.get(n), 2) if n in v else "–" for n in names) + " |"
                  for k, v in per_task.items()]
        lines.append("")
    for key, matrix in confusions.items():
        chosen = {c for row in matrix.values() for c in row}
        cols = names if chosen <= set(names) else sorted(chosen)  # tasks, or what else is chosen (groups)
        lines += [f"{key.replace('_', ' ')} (rows: true task, columns: chosen):", "",
                  "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {t} | " + " | ".join(str(matrix[t].get(n, 0)) for n in cols) + " |" for t in names if t in matrix]
        lines.append("")
    return lines


def general_markdown(results: dict[str, Any]) -> list[str]:
    """The general tasks (never trained) at every stage, and their retention."""
    general = results.get("general")
    if not general:
        return []
    cols = [(t["name"], s) for t in general["tasks"] for s in t["scorers"]]
    lines = ["## General tasks (never trained; not in MFN/BWT)", "",
             "| stage | " + " | ".join(f"{t} {s}" for t, s in cols) + " |", "|---|" + "---|" * len(cols)]
    for stage, scores in sorted(general["scores"].items()):
        lines.append(f"| {stage.replace('_', ' ')} | "
                     + " | ".join(_fmt(scores.get(t, {}).get(s)) for t, s in cols) + " |")
    if general.get("retention"):
        lines += ["", "Retention (last stage / zero-shot): " + retention_text(results) + "."]
    return lines + [""]


def _bad_samples_section(results: dict[str, Any]) -> list[str]:
    """What ``on_bad_sample: skip`` left out, when it left anything: per task (training) and per
    task and stage (test rows; each of those scores is over the rows scored)."""
    bad = results.get("bad_samples") or {}
    train = {n: t for n, t in bad.get("train", {}).items() if t["skipped"]}
    stages = {s: {n: t for n, t in tasks.items() if t["skipped"]} for s, tasks in sorted(bad.get("eval", {}).items())}
    stages = {s: tasks for s, tasks in stages.items() if tasks}
    if not train and not stages:
        return []
    why = lambda t: ", ".join(f"{n} x {r}" for r, n in t["reasons"].items())  # noqa: E731
    lines = ["## Bad input skipped", "", "| where | task | skipped | scored | why |", "|---|---|---|---|---|"]
    lines += [f"| training | {n} | {t['skipped']} | – | {why(t)} |" for n, t in train.items()]
    lines += [f"| {s} | {n} | {t['skipped']} | {t['scored']} | {why(t)} |" for s, tasks in stages.items()
              for n, t in tasks.items()]
    return lines + [""]
