"""Built-in benchmark definitions: CoIN, UCIT and MLLM-DCL over the user's own copy of the data.

A definition fixes what the benchmark's papers fix: the task order, the files
each task reads (relative to one root folder the user gives), the scorer of
each task (scored in ``official`` mode, the benchmark's published script,
unless the run asks for ``clean``) and a generation budget per task. In a
config::

    data:
      benchmark: coin          # coin | ucit | mllm_dcl
      root: /data/coin         # the folder laid out as below
      paths: {instructions: Instructions_Diverse}   # optional: another instruction variant

``resolve`` checks every file of the selected tasks at once: a missing file
is one ``BenchmarkLayoutError`` that lists every missing path and the layout
expected, so a wrong root is found in one run, not one file per run. Images
are checked when records are read (``on_bad_sample`` applies).

Where a benchmark's own scripts read a file in more than one place (CoIN's
TextVQA test file is ``val.json`` in its scripts, UCIT's folders are named
differently in MCITlib and HiDe-LLaVA), a file lists its alternatives and the
first that exists is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mllm_cl.data.tasks import TaskSpec


@dataclass(frozen=True)
class TaskDef:
    """One task of a built-in benchmark; paths are relative to the root and may name a placeholder.

    Args:
        name: the task's name in results.
        train: training file (LLaVA conversation JSON); alternatives, the first that exists wins.
        test: test file (JSON list or JSONL of test rows); alternatives.
        scorer: a rule of ``mllm_cl.eval.rules.RULES`` or ``CORPUS_RULES``.
        max_new_tokens: generation budget at evaluation.
        images: folder the files' image paths are relative to.
        annotation: file holding the test answers (alternatives), with ``annotation_format``.
        mode: the scorer mode the definition is meant to be reported in.
    """

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    scorer: str
    max_new_tokens: int
    images: str = "{images}"
    annotation: tuple[str, ...] = ()
    annotation_format: str | None = None
    mode: str = "official"


@dataclass(frozen=True)
class BenchmarkDef:
    """A benchmark: tasks in training order, placeholders in their paths (with defaults), and notes."""

    name: str
    title: str
    source: str
    tasks: tuple[TaskDef, ...]
    paths: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


class BenchmarkLayoutError(FileNotFoundError):
    """Files of a built-in benchmark are missing under its root; the message lists all of them and the layout."""


def _coin_task(name: str, scorer: str, tokens: int, *, test=("test.json",), annotation=(), fmt=None) -> TaskDef:
    folder = f"{{instructions}}/{name}"
    return TaskDef(name, (f"{folder}/train.json",), tuple(f"{folder}/{t}" for t in test), scorer, tokens,
                   annotation=annotation, annotation_format=fmt)


COIN = BenchmarkDef(
    name="coin",
    title="CoIN (NeurIPS 2024)",
    source="zackschen/CoIN: scripts/CoIN/Train, scripts/CoIN/Eval, ETrain/Eval/LLaVA/CoIN",
    paths={"instructions": "Instructions", "images": "cl_dataset"},
    tasks=(
        _coin_task("ScienceQA", "coin_scienceqa", 16),
        _coin_task("TextVQA", "coin_textvqa", 32, test=("val.json", "test.json"),
                   annotation=("{images}/TextVQA/TextVQA_0.5.1_val.json",), fmt="textvqa"),
        _coin_task("ImageNet", "coin_imagenet", 32),
        _coin_task("GQA", "coin_gqa", 16),
        _coin_task("VizWiz", "coin_vizwiz", 32),
        _coin_task("Grounding", "coin_grounding", 64),
        _coin_task("VQAv2", "coin_vqav2", 16),
        _coin_task("OCRVQA", "coin_ocrvqa", 64, test=("test.json", "test_1.json")),
    ),
    notes=(
        "instructions: one of the instruction variants of the CoIN dataset (Zacks-Chen/CoIN); set "
        "data.paths.instructions to use another (e.g. Instructions_Diverse, Instructions_10Type)",
        "images: the image sources (COCO2014, GQA, OCR-VQA, TextVQA, ScienceQA, VizWiz, ImageNet); the JSON files' "
        "'image' paths are relative to it",
        "TextVQA is scored against the ten human answers of TextVQA_0.5.1_val.json, as CoIN's eval_textvqa.py does",
    ),
)


def _ucit_task(name: str, folders: tuple[str, ...], train: str, scorer: str, tokens: int, *,
               captions: bool = False) -> TaskDef:
    annotation = tuple(f"{f}/val_coco_type_3000.json" for f in folders) if captions else ()
    return TaskDef(name, tuple(f"{f}/{train}" for f in folders), tuple(f"{f}/test_3000.json" for f in folders),
                   scorer, tokens, annotation=annotation, annotation_format="coco_captions" if captions else None)


UCIT = BenchmarkDef(
    name="ucit",
    title="UCIT (HiDe-LLaVA, MCITlib)",
    source="Ghy0501/MCITlib: configs/data_configs/UCIT/*.json, scripts/*/Eval_UCIT",
    paths={"images": "."},
    tasks=(
        _ucit_task("ImageNet-R", ("ImageNet-R",), "train.json", "ucit_imagenet_r", 32),
        _ucit_task("ArxivQA", ("ArxivQA",), "train_4w.json", "ucit_arxivqa", 16),
        _ucit_task("VizWiz-Caption", ("VizWiz-caption", "VizWiz"), "train.json", "ucit_vizwiz_caption", 64,
                   captions=True),
        _ucit_task("IconQA", ("IconQA",), "train.json", "ucit_iconqa", 32),
        _ucit_task("CLEVR-Math", ("CLEVR-Math", "CLEVR"), "train_4w.json", "ucit_clevr_math", 16),
        _ucit_task("Flickr30k", ("Flickr30k-cap", "Flickr30k"), "train_brief_4w.json", "ucit_flickr30k", 64,
                   captions=True),
    ),
    notes=(
        "folder names as in MCITlib's data configs; HiDe-LLaVA's names (VizWiz, CLEVR, Flickr30k) are accepted too",
        "images: the JSON files' 'image' paths are relative to the root (set data.paths.images otherwise)",
        "VizWiz-Caption and Flickr30k are scored against val_coco_type_3000.json (COCO references, image ids = "
        "test rows 1..N in file order) with the caption average, which needs the 'captions' extra and Java",
    ),
)


def _dcl_task(name: str, scorer: str, tokens: int) -> TaskDef:
    return TaskDef(name, (f"{name}/train.json",), (f"{name}/test.json",), scorer, tokens, images=name)


MLLM_DCL = BenchmarkDef(
    name="mllm_dcl",
    title="MLLM-DCL (MLLM-CL, MCITlib)",
    source="Ghy0501/MCITlib: configs/data_configs/MLLM-DCL/*.json, scripts/*/Eval_MLLM_DCL",
    tasks=(
        _dcl_task("RS", "mllm_dcl_rs", 32),
        _dcl_task("Med", "mllm_dcl_med", 32),
        _dcl_task("AD", "mllm_dcl_ad", 32),
        _dcl_task("Sci", "mllm_dcl_sci", 64),
        _dcl_task("Fin", "mllm_dcl_fin", 64),
    ),
    notes=(
        "one folder per domain; its JSON files' 'image' paths are relative to that folder",
        "Sci picks its rule from the image file name's prefix (AI2D_, TQA_, VQA_, SciVerse_, else MapQA)",
    ),
)

BENCHMARKS: dict[str, BenchmarkDef] = {b.name: b for b in (COIN, UCIT, MLLM_DCL)}


def canonical_name(name: str) -> str | None:
    """The built-in benchmark a config names (``coin``, ``UCIT``, ``mllm-dcl`` ...), or ``None``."""
    key = name.strip().lower().replace("-", "_")
    return key if key in BENCHMARKS else None


def get_benchmark(name: str) -> BenchmarkDef:
    """The built-in definition called ``name``; a ValueError lists the built-in names."""
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown benchmark {name!r}; built-in: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def _placeholders(bench: BenchmarkDef, paths: dict[str, str] | None) -> dict[str, str]:
    values = dict(bench.paths)
    for key, value in (paths or {}).items():
        if key not in values:
            known = ", ".join(values) or "none"
            raise ValueError(f"data.paths.{key}: benchmark {bench.name} has no such path (its paths: {known})")
        values[key] = str(value)
    return values


def layout(bench: BenchmarkDef | str, paths: dict[str, str] | None = None) -> str:
    """The layout expected under the root, one line per file (alternatives after ``or``), then the notes."""
    bench = get_benchmark(bench) if isinstance(bench, str) else bench
    values = _placeholders(bench, paths)
    lines, seen = ["ROOT/"], set()

    def add(options: tuple[str, ...], what: str) -> None:
        shown = [o.format(**values) for o in options]
        text = shown[0] + "".join(f"  (or {o})" for o in shown[1:])
        if text not in seen:
            seen.add(text)
            lines.append(f"  {text:<56}  # {what}")

    for t in bench.tasks:
        add(t.train, f"{t.name} training conversations")
        add(t.test, f"{t.name} test rows")
        if t.annotation:
            add(t.annotation, f"{t.name} answers ({t.annotation_format})")
    for images in dict.fromkeys(t.images for t in bench.tasks):
        folder = images.format(**values).rstrip("/")
        add((folder + "/",), "images" if folder not in ("", ".") else "images (under ROOT itself)")
    return "\n".join(lines + [f"  * {note}" for note in bench.notes])


def _first_existing(root: Path, options: tuple[str, ...], values: dict[str, str]) -> tuple[Path | None, str]:
    candidates = [root / o.format(**values) for o in options]
    for c in candidates:
        if c.is_file():
            return c, ""
    return None, str(candidates[0]) + "".join(f" (or {c})" for c in candidates[1:])


def resolve(name: str, root: str | Path, *, paths: dict[str, str] | None = None,
            tasks: list[str] | None = None) -> list[TaskSpec]:
    """The tasks of built-in benchmark ``name`` under ``root``, in the benchmark's order, every file checked.

    ``paths`` overrides the definition's placeholders (``instructions``, ``images``);
    ``tasks`` limits the check (and the result) to those task names. Raises
    ``BenchmarkLayoutError`` listing every missing file and the expected layout.
    """
    bench = get_benchmark(name)
    values = _placeholders(bench, paths)
    root = Path(root).expanduser()
    chosen = list(bench.tasks)
    if tasks is not None:
        unknown = [n for n in tasks if n not in bench.task_names]
        if unknown:
            raise ValueError(f"benchmark {bench.name} has no task {', '.join(map(repr, unknown))}; "
                             f"its tasks: {', '.join(bench.task_names)}")
        chosen = [t for t in chosen if t.name in tasks]
    missing: list[str] = []
    specs: list[TaskSpec] = []
    if not root.is_dir():
        missing.append(f"{root} (the root folder itself)")
    else:
        for t in chosen:
            train, m_train = _first_existing(root, t.train, values)
            test, m_test = _first_existing(root, t.test, values)
            annotation, m_ann = _first_existing(root, t.annotation, values) if t.annotation else (None, "")
            images = root / t.images.format(**values)
            missing += [f"{m}   [{t.name} {what}]" for m, what in
                        ((m_train, "train"), (m_test, "test"), (m_ann, "annotation")) if m]
            if not images.is_dir():
                missing.append(f"{images}/   [{t.name} images]")
            specs.append(TaskSpec(name=t.name, train=str(train), test=str(test), image_root=str(images),
                                  scorer=t.scorer, max_new_tokens=t.max_new_tokens,
                                  annotation=None if annotation is None else str(annotation),
                                  annotation_format=t.annotation_format))
    if missing:
        listed = "\n".join(f"  - {m}" for m in dict.fromkeys(missing))
        raise BenchmarkLayoutError(
            f"benchmark {bench.name} (data.root={root}): {len(dict.fromkeys(missing))} missing path(s):\n{listed}\n"
            f"expected layout under data.root ({bench.title}):\n{layout(bench, paths)}")
    return specs


def describe(name: str) -> str:
    """A table of the benchmark's tasks (order, scorer, mode, budget) followed by its layout."""
    bench = get_benchmark(name)
    rows = [f"{bench.title} [{bench.name}], from {bench.source}",
            f"{'#':>2}  {'task':<15} {'scorer':<22} {'mode':<9} max_new_tokens"]
    for i, t in enumerate(bench.tasks, 1):
        rows.append(f"{i:>2}  {t.name:<15} {t.scorer:<22} {t.mode:<9} {t.max_new_tokens}")
    return "\n".join(rows) + "\n\nlayout:\n" + layout(bench)
