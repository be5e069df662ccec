"""Task definitions: where a task's files are and how it is scored.

A task sequence is a list of ``TaskSpec``; the synthetic benchmark's
``benchmark.json`` manifest (written by ``mllm-cl data synth``) is read into
the same list, with paths resolved against the manifest's folder, and so are
the built-in CoIN, UCIT and MLLM-DCL definitions (``mllm_cl.data.benchmarks``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TaskSpec:
    """One task of a sequence.

    Args:
        name: the task's name in results and reports.
        train: training file (LLaVA conversation JSON).
        test: test file (JSON list or JSONL of test rows).
        image_root: folder that image paths in both files are relative to.
        scorer: the scoring rule's name (see ``mllm_cl.eval``).
        max_new_tokens: generation budget at evaluation.
        annotation: a file that holds the test rows' answers (TextVQA's ten human
            answers, a COCO caption file); ``None``: the test rows carry them.
        annotation_format: ``textvqa`` or ``coco_captions`` (see ``formats.read_annotation``).
        train_shards: train from these WebDataset shards (a folder written by
            ``mllm-cl data shard``, a tar file, or a glob) instead of ``train``.
    """

    name: str
    train: str
    test: str
    image_root: str | None = None
    scorer: str = "exact_match"
    max_new_tokens: int = 16
    annotation: str | None = None
    annotation_format: str | None = None
    train_shards: str | None = None


def load_manifest(path: str | Path) -> list[TaskSpec]:
    """Tasks of a ``benchmark.json`` manifest, in its order, paths made absolute."""
    path = Path(path)
    if path.is_dir():
        path = path / "benchmark.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (generate it with `mllm-cl data synth --out {path.parent}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    root = path.parent
    tasks = []
    for i, t in enumerate(manifest.get("tasks", [])):
        missing = [k for k in ("name", "train", "test") if k not in t]
        if missing:
            raise ValueError(f"{path}: task {i} lacks {', '.join(missing)}")
        tasks.append(TaskSpec(
            name=t["name"],
            train=str(root / t["train"]),
            test=str(root / t["test"]),
            image_root=str(root / t.get("image_root", "")),
            scorer=t.get("scorer", "exact_match"),
            max_new_tokens=int(t.get("max_new_tokens", 16)),
            annotation=str(root / t["annotation"]) if t.get("annotation") else None,
            annotation_format=t.get("annotation_format"),
            train_shards=str(root / t["train_shards"]) if t.get("train_shards") else None,
        ))
    if not tasks:
        raise ValueError(f"{path}: the manifest lists no tasks")
    return tasks
