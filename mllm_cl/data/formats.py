"""The file formats users bring, read as published, validated record by record.

Training: LLaVA conversation JSON, a list of
``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}``
(``image`` may be missing: a text-only sample; multi-turn allowed; the loss
covers the ``gpt`` turns only).

Test: a JSON list or JSONL of ``{"question_id", "image"?, "text", "answer"}``
where ``answer`` is a string or a list of strings (VQA's human answers);
other keys (``image`` as written, ``answer_bbox``, ``size``, ...) are kept for
the scorer. Where a benchmark keeps the answers in a separate annotation file
(TextVQA's ten human answers, the UCIT captions' COCO references),
``read_annotation`` reads it and ``load_test_records(answers_from=...)`` puts
them in each row's ``answer``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_cl.data.errors import BadSampleError, OnBadSample, SkipLog, handle

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    id: str
    image: Path | None
    turns: list[tuple[str, str]]  # (role, text) with role "user" | "assistant"
    source: str = ""  # "file, record N" for error messages

    @property
    def instruction(self) -> str:
        """The user turns only (no answers): what instruction-embedding routers see."""
        return "\n".join(text for role, text in self.turns if role == "user")


@dataclass
class TestRecord:
    question_id: str
    image: Path | None
    prompt: str
    answer: str | list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def as_record(self) -> dict[str, Any]:
        """The row as the scorers take it (keys of the test-file format)."""
        return {"question_id": self.question_id, "text": self.prompt, "answer": self.answer, **self.extra}


def read_records(path: str | Path) -> list[Any]:
    """A JSON list, or JSONL (one JSON value per line); errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadSampleError(str(path), f"malformed JSON on line {i}: {e.msg}") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSampleError(str(path), f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise BadSampleError(str(path), f"expected a JSON list of records, got {type(data).__name__}")
    return data


# ``resolve(name, where)`` turns a record's image name into what the datasets load (a shard's member
# bytes); by default the name is a file under ``image_root`` that must exist.
Resolve = Callable[[str, str], Any]


def _image(record: dict, image_root: Path | None, where: str, resolve: Resolve | None = None) -> Any:
    name = record.get("image")
    if name in (None, ""):
        return None
    if not isinstance(name, str):
        raise BadSampleError(where, f"malformed record: 'image' must be a string path, got {type(name).__name__}")
    if resolve is not None:
        return resolve(name, where)
    path = Path(name) if image_root is None else Path(image_root) / name
    if not path.is_file():
        raise BadSampleError(where, f"missing image: {path}")
    return path


def parse_conversation(record: Any, image_root: Path | None, where: str, *,
                       resolve: Resolve | None = None) -> Conversation:
    """One training record checked and parsed; ``where`` ("file, record N") starts every error message."""
    if not isinstance(record, dict):
        raise BadSampleError(where, f"malformed record: expected an object, got {type(record).__name__}")
    turns_raw = record.get("conversations")
    if not isinstance(turns_raw, list) or not turns_raw:
        raise BadSampleError(where, "malformed record: 'conversations' must be a non-empty list")
    turns = []
    for j, turn in enumerate(turns_raw):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSampleError(where, f"malformed record: turn {j} needs a string 'value'")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise BadSampleError(where, f"malformed record: turn {j} has unknown role {turn.get('from')!r}")
        turns.append((role, turn["value"]))
    if not any(role == "assistant" for role, _ in turns):
        raise BadSampleError(where, "no assistant turn: nothing to learn from this conversation")
    image = _image(record, image_root, where, resolve)
    n_placeholders = sum(text.count("<image>") for _, text in turns)
    if image is not None and n_placeholders == 0:
        # LLaVA's own loader puts the image first when the text has no placeholder.
        role, text = turns[0]
        turns[0] = (role, "<image>\n" + text)
    elif image is None and n_placeholders:
        raise BadSampleError(where, "malformed record: '<image>' in the text but no 'image' field")
    elif n_placeholders > 1:
        raise BadSampleError(where, f"malformed record: {n_placeholders} '<image>' placeholders for one image")
    return Conversation(id=str(record.get("id", where)), image=image, turns=turns, source=where)


def parse_test_record(record: Any, image_root: Path | None, where: str, *,
                      resolve: Resolve | None = None) -> TestRecord:
    """One test row checked and parsed; the row's other keys (``image`` as written included) go to ``extra``."""
    if not isinstance(record, dict):
        raise BadSampleError(where, f"malformed record: expected an object, got {type(record).__name__}")
    for key in ("question_id", "text", "answer"):
        if key not in record:
            raise BadSampleError(where, f"malformed record: missing '{key}'")
    answer = record["answer"]
    if not (isinstance(answer, str) or (isinstance(answer, list) and all(isinstance(a, str) for a in answer))):
        raise BadSampleError(where, "malformed record: 'answer' must be a string or a list of strings")
    image = _image(record, image_root, where, resolve)
    prompt = record["text"]
    if image is not None and "<image>" not in prompt:
        prompt = "<image>\n" + prompt
    # ``image`` stays as written: MLLM-DCL Sci's scorer picks its rule from the image file name.
    extra = {k: v for k, v in record.items() if k not in ("question_id", "text", "answer")}
    if extra.get("image") in (None, ""):
        extra.pop("image", None)
    return TestRecord(str(record["question_id"]), image, prompt, answer, extra, where)


def _load(path, image_root, parse, on_bad_sample: OnBadSample, skips: SkipLog | None, limit: int | None,
          answers_from: AnswerSource | None = None):
    path = Path(path)
    root = None if image_root is None else Path(image_root)
    out = []
    for i, record in enumerate(read_records(path)):
        if limit is not None and len(out) >= limit:
            break
        try:
            if answers_from is not None:
                if not isinstance(record, dict):
                    raise BadSampleError(str(path),
                                         f"malformed record: expected an object, got {type(record).__name__}", i)
                record = {**record, "answer": answers_from(i, record, f"{path}, record {i}")}
            out.append(parse(record, root, f"{path}, record {i}"))
        except BadSampleError as e:
            handle(e, on_bad_sample, skips)
    return out


def load_conversations(path, image_root=None, *, on_bad_sample: OnBadSample = "raise",
                       skips: SkipLog | None = None, limit: int | None = None) -> list[Conversation]:
    """LLaVA conversation records; images resolved against ``image_root`` and checked to exist."""
    return _load(path, image_root, parse_conversation, on_bad_sample, skips, limit)


def load_test_records(path, image_root=None, *, on_bad_sample: OnBadSample = "raise",
                      skips: SkipLog | None = None, limit: int | None = None,
                      answers_from: AnswerSource | None = None) -> list[TestRecord]:
    """Test rows (JSON list or JSONL); images resolved against ``image_root``.

    ``answers_from(position, row, where)`` (see ``read_annotation``) replaces each row's
    ``answer`` before the row is checked, for benchmarks that keep answers apart.
    """
    return _load(path, image_root, parse_test_record, on_bad_sample, skips, limit, answers_from)


# --------------------------------------------------------------------------- annotation files

AnswerSource = Callable[[int, dict, str], Any]
"""``(position in the test file, row, "file, record N") -> the row's answer``."""

ANNOTATION_FORMATS = ("textvqa", "coco_captions")


def read_annotation(path: str | Path, fmt: str) -> AnswerSource:
    """Read an annotation file that holds a test file's answers; return the lookup for ``load_test_records``.

    - ``textvqa``: ``{"data": [{"question_id", "answers": [ten strings]}, ...]}``
      (``TextVQA_0.5.1_val.json``), matched by ``question_id`` as CoIN's
      ``eval_textvqa.py`` does.
    - ``coco_captions``: a COCO caption file (UCIT's ``val_coco_type_3000.json``,
      ``{"images": [...], "annotations": [{"image_id", "caption"}, ...]}``), whose
      image ids are the test rows' positions 1..N in file order, as MCITlib's
      ``eval_caption.py`` numbers predictions; a row's answer is the list of its references.
    """
    path = Path(path)
    if fmt not in ANNOTATION_FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; formats: {', '.join(ANNOTATION_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (annotation file, format {fmt})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadSampleError(str(path), f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    table: dict[Any, list[str]] = {}
    try:
        if fmt == "textvqa":
            for entry in data["data"]:
                table[str(entry["question_id"])] = [str(a) for a in entry["answers"]]
        else:
            for entry in data["annotations"]:
                table.setdefault(int(entry["image_id"]), []).append(str(entry["caption"]))
    except (KeyError, TypeError, ValueError) as e:
        what = "'data': [{question_id, answers}]" if fmt == "textvqa" else "'annotations': [{image_id, caption}]"
        raise BadSampleError(str(path),
                             f"not a {fmt} annotation file (expected {what}): {type(e).__name__} {e}") from None

    def answers_from(position: int, record: dict, where: str) -> list[str]:
        key = str(record.get("question_id")) if fmt == "textvqa" else position + 1
        if key not in table:
            name = f"question_id {key}" if fmt == "textvqa" else f"image_id {key} (the row's position in the test file)"
            raise BadSampleError(where, f"no answers in annotation {path} for {name}")
        return table[key]

    return answers_from
