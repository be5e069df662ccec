"""The synthetic benchmark: deterministic, well-formed, balanced, consistent with its pictures, and fast."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_cl.data.draw import BACKGROUND, COLOURS, SHAPES
from mllm_cl.data.formats import load_conversations, load_test_records
from mllm_cl.data.synth import SHAPE_TASKS as TASKS
from mllm_cl.data.synth import WORDS, ensure, generate, sample
from mllm_cl.data.tasks import load_manifest

TRAIN, TEST = 200, 100


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _components(mask: np.ndarray) -> int:
    """8-connected blobs of a boolean mask (no scipy in the stack)."""
    seen, n = np.zeros_like(mask), 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=False):
        if seen[y, x]:
            continue
        n, stack, seen[y, x] = n + 1, [(y, x)], True
        while stack:
            cy, cx = stack.pop()
            for yy in range(max(0, cy - 1), min(h, cy + 2)):
                for xx in range(max(0, cx - 1), min(w, cx + 2)):
                    if mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
    return n


def _mask(image, colour: str) -> np.ndarray:
    return (np.asarray(image) == COLOURS[colour]).all(-1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    t0 = time.perf_counter()
    generate(out, train_size=TRAIN, test_size=TEST, seed=3, progress=False)
    return out, time.perf_counter() - t0


def test_generation_is_fast(bench):
    _, seconds = bench
    assert seconds < 60  # 8 tasks x 300 images; about 1.5 s on one core


def test_same_seed_same_bytes_other_seed_other_data(bench, tmp_path):
    out, _ = bench
    generate(tmp_path / "again", train_size=TRAIN, test_size=TEST, seed=3, progress=False)
    assert _digest(out) == _digest(tmp_path / "again")
    generate(tmp_path / "other", tasks=["color"], train_size=TRAIN, test_size=TEST, seed=4, progress=False)
    assert (out / "color/train.json").read_bytes() != (tmp_path / "other/color/train.json").read_bytes()
    same = sum((out / "color/images" / p.name).read_bytes() == p.read_bytes()
               for p in (tmp_path / "other/color/images").iterdir())
    assert same < 5


def test_a_smaller_rerun_leaves_no_stale_images(tmp_path):
    generate(tmp_path / "a", tasks="ocr", train_size=6, test_size=3, progress=False)
    generate(tmp_path / "a", tasks="ocr", train_size=3, test_size=2, progress=False)
    generate(tmp_path / "b", tasks=["ocr"], train_size=3, test_size=2, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_ensure_regenerates_only_what_differs(tmp_path, caplog):
    out = tmp_path / "b"
    assert ensure(out, tasks=["count"], train_size=4, test_size=2, progress=False)
    first = _digest(out)
    assert not ensure(out, tasks=["count"], train_size=4, test_size=2, progress=False)
    assert ensure(out, tasks=["count"], train_size=5, test_size=2, progress=False)
    assert "train_size differ" in caplog.text
    manifest = json.loads((out / "benchmark.json").read_text())
    manifest["version"] = 1  # a folder an older mllm-cl wrote
    (out / "benchmark.json").write_text(json.dumps(manifest))
    assert ensure(out, tasks=["count"], train_size=4, test_size=2, progress=False)
    assert "version differ" in caplog.text and _digest(out) == first
    (out / "benchmark.json").write_text("{not json")
    assert ensure(out, tasks=["count"], train_size=4, test_size=2, progress=False)
    assert _digest(out) == first


def test_manifest(bench):
    out, _ = bench
    manifest = json.loads((out / "benchmark.json").read_text())
    assert {k: manifest[k] for k in ("format", "version", "seed", "image_size", "train_size", "test_size")} == {
        "format": "mllm-cl/synthetic", "version": 3, "seed": 3, "image_size": 48, "train_size": TRAIN,
        "test_size": TEST}
    assert [t["name"] for t in manifest["tasks"]] == list(TASKS) == [
        "classify", "color", "count", "ocr", "ground", "choice", "spatial", "caption"]
    scorers = {"ground": "grounding_iou", "choice": "option_accuracy", "caption": "caption"}
    for entry in manifest["tasks"]:
        name = entry["name"]
        assert entry == {"name": name, "scorer": scorers.get(name, "exact_match"), "train": f"{name}/train.json",
                         "test": f"{name}/test.json", "image_root": name,
                         "max_new_tokens": TASKS[name].max_new_tokens, "answer_format": TASKS[name].answer_format,
                         "domain": "words" if name == "ocr" else "shapes"}
    assert "sources" not in manifest  # everything in this suite is drawn here


def test_records_are_well_formed_and_load_in_the_user_formats(bench):
    out, _ = bench
    for name, spec in TASKS.items():
        train = json.loads((out / name / "train.json").read_text())
        test = json.loads((out / name / "test.json").read_text())
        assert len(train) == TRAIN and len(test) == TEST
        for i, r in enumerate(train):
            assert set(r) == {"id", "image", "conversations"} and r["image"] == f"images/{name}_train_{i:05d}.png"
            (human, gpt), = [r["conversations"]]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert human["value"].count("<image>") == 1
            assert gpt["from"] == "gpt" and gpt["value"]
            assert (out / name / r["image"]).is_file()
        for i, r in enumerate(test):
            keys = {"question_id", "image", "text", "answer"} | ({"answer_bbox", "size"} if name == "ground" else set())
            assert set(r) == keys and r["image"] == f"images/{name}_test_{i:05d}.png"
            assert r["text"].startswith("<image>\n") and r["answer"]
            # A byte-level tokenizer needs one token per character, a leading space and EOS.
            assert len(r["answer"]) + 2 <= spec.max_new_tokens
        assert len({r["id"] for r in train}) == TRAIN and len({r["question_id"] for r in test}) == TEST
        assert not {r["image"] for r in train} & {r["image"] for r in test}
    for spec in load_manifest(out):
        convs = load_conversations(spec.train, spec.image_root)
        assert all([role for role, _ in c.turns] == ["user", "assistant"] for c in convs)
        assert len(load_test_records(spec.test, spec.image_root)) == TEST


def test_grounding_boxes_hold_their_object(bench):
    out, _ = bench
    for row in json.loads((out / "ground/test.json").read_text()):
        assert re.fullmatch(r"\[\d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d\]", row["answer"])
        x1, y1, x2, y2 = map(float, row["answer_bbox"][1:-1].split(", "))
        assert row["answer"] == row["answer_bbox"] and row["size"] == [48, 48]
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        colour = re.search(r"Where is the (\w+) ", row["text"]).group(1)
        ys, xs = np.nonzero(_mask(Image.open(out / "ground" / row["image"]).convert("RGB"), colour))
        assert len(xs) > 0
        # Every pixel of the named object's colour lies in the box (one pixel of rounding slack).
        assert xs.min() >= x1 * 48 - 1.5 and xs.max() <= x2 * 48 + 1.5
        assert ys.min() >= y1 * 48 - 1.5 and ys.max() <= y2 * 48 + 1.5


@pytest.mark.parametrize("task", [t for t in TASKS if t != "ocr"])
def test_objects_keep_apart_and_off_the_border(task):
    for i in range(100):
        objs = sample(task, "train", i).objects
        assert objs
        for k, a in enumerate(objs):
            x1, y1, x2, y2 = a.box()
            assert x1 >= 1 and y1 >= 1 and x2 <= 47 and y2 <= 47
            for b in objs[k + 1:]:
                # A 1 px gap between boxes, less the 0.1 px rounding of the stored centres.
                assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= a.r + b.r + 0.9


def test_answers_follow_the_drawn_scene():
    for i in range(150):
        s = sample("classify", "test", i)
        assert len(s.objects) == 1 and s.answer == s.objects[0].shape
        s = sample("color", "test", i)
        shape = re.fullmatch(r"What color is the (\w+)\?", s.instruction).group(1)
        assert [o.colour for o in s.objects if o.shape == shape] == [s.answer] and _mask(s.image, s.answer).any()
        s = sample("ground", "test", i)
        colour, shape = re.match(r"Where is the (\w+) (\w+)\?", s.instruction).groups()
        (target,) = [o for o in s.objects if (o.colour, o.shape) == (colour, shape)]
        assert s.answer == "[" + ", ".join(f"{v / 48:.2f}" for v in target.box()) + "]"
        s = sample("choice", "test", i)
        assert 2 <= len(s.objects) <= 4 and len({o.shape for o in s.objects}) == len(s.objects)
        options = dict(re.findall(r"^([A-D])\. (\w+)$", s.instruction, re.MULTILINE))
        assert list(options) == list("ABCD") and len(set(options.values())) == 4
        assert {o.shape for o in s.objects} <= set(options.values())
        big, *rest = sorted(s.objects, key=lambda o: -o.r)
        assert options[s.answer] == big.shape and all(big.r > 1.3 * o.r for o in rest)
        s = sample("spatial", "test", i)
        c1, s1, c2, s2 = re.fullmatch(r"Is the (\w+) (\w+) to the left of the (\w+) (\w+)\? Answer yes or no\.",
                                      s.instruction).groups()
        left = np.nonzero(_mask(s.image, c1))[1].mean() < np.nonzero(_mask(s.image, c2))[1].mean()
        assert s.answer == ("yes" if left else "no")
        assert {(c1, s1), (c2, s2)} == {(o.colour, o.shape) for o in s.objects}
        s = sample("caption", "test", i)
        where = r"center|(?:top|middle|bottom) (?:left|center|right)"
        parts = re.findall(rf"a (\w+) (\w+) at the ({where})", s.answer)
        assert sorted(p[:2] for p in parts) == sorted((o.colour, o.shape) for o in s.objects)
        assert s.answer.endswith(".") and (len(parts) == 1) == (" and " not in s.answer)
        for colour, shape, where in parts:
            (o,) = [o for o in s.objects if (o.colour, o.shape) == (colour, shape)]
            row, col = ("middle", "center") if where == "center" else where.split()
            assert ("top", "middle", "bottom").index(row) == min(2, int(o.cy * 3 // 48))
            assert ("left", "center", "right").index(col) == min(2, int(o.cx * 3 // 48))


def test_count_answers_count_the_drawn_targets():
    merged = 0
    for i in range(300):
        s = sample("count", "train", i)
        shape = re.fullmatch(r"How many (\w+)s are there\?", s.instruction).group(1)
        targets = [o for o in s.objects if o.shape == shape]
        assert s.answer == str(len(targets)) and len(s.objects) - len(targets) <= 1
        assert len({o.colour for o in targets}) == 1 and all(o.colour != targets[0].colour
                                                              for o in s.objects if o.shape != shape)
        blobs = _components(_mask(s.image, targets[0].colour))
        assert blobs <= len(targets)
        merged += blobs < len(targets)
    # Boxes keep a 1 px gap, which rasterization can close diagonally: rare, and counted here.
    assert merged <= 9


def test_answers_are_balanced():
    spatial = Counter(sample("spatial", "train", i).answer for i in range(400))
    assert 160 < spatial["yes"] < 240 and set(spatial) == {"yes", "no"}
    letters = Counter(sample("choice", "train", i).answer for i in range(400))
    assert set(letters) == set("ABCD") and min(letters.values()) > 60
    counts = Counter(sample("count", "train", i).answer for i in range(500))
    assert set(counts) == {"1", "2", "3", "4", "5"} and min(counts.values()) > 60
    shapes = Counter(sample("classify", "train", i).answer for i in range(300))
    assert set(shapes) == set(SHAPES) and min(shapes.values()) > 25
    colours = Counter(sample("color", "train", i).answer for i in range(300))
    assert set(colours) == set(COLOURS) and min(colours.values()) > 25


def test_ocr_draws_words_from_its_list():
    assert len(set(WORDS)) == len(WORDS) >= 10
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 5 for w in WORDS)
    seen = Counter()
    for i in range(300):
        s = sample("ocr", "train", i)
        seen[s.answer] += 1
        ink = (np.asarray(s.image) != BACKGROUND).any(-1)
        ys, xs = np.nonzero(ink)
        # At least twice the font size, every word (the widest too): x-height 5 px at 1x.
        assert ink.sum() > 60 and ys.max() - ys.min() >= 9 and xs.max() - xs.min() >= 24
    assert set(seen) == set(WORDS)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic task.*classify, color, count"):
        generate(tmp_path, tasks=["colour"], progress=False)
    with pytest.raises(ValueError, match="no tasks"):
        generate(tmp_path, tasks=[], progress=False)
    with pytest.raises(ValueError, match="repeat"):
        generate(tmp_path, tasks=["color", "color"], progress=False)
    for bad in ({"train_size": 0}, {"test_size": -1}):
        with pytest.raises(ValueError, match="must be positive"):
            generate(tmp_path, progress=False, **bad)
    for bad in ({"train_size": 2.5}, {"image_size": "48"}, {"seed": True}):
        with pytest.raises(ValueError, match="must be an integer"):
            generate(tmp_path, progress=False, **bad)
    with pytest.raises(ValueError, match="at least 32"):
        generate(tmp_path, image_size=16, progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        generate(tmp_path, seed=-1, progress=False)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_the_smallest_image_size_works(tmp_path):
    manifest = generate(tmp_path, train_size=20, test_size=5, image_size=32, progress=False)
    assert manifest["image_size"] == 32
    assert Image.open(tmp_path / "count/images/count_test_00004.png").size == (32, 32)


def test_cli_writes_the_benchmark(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "data", "synth", "--out", str(tmp_path / "b"),
                          "--tasks", "count", "spatial", "--train-size", "10", "--test-size", "5", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote 2 tasks (count, spatial)" in out.stdout
    assert [t.name for t in load_manifest(tmp_path / "b")] == ["count", "spatial"]
    bad = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "data", "synth", "--out", str(tmp_path / "c"),
                          "--tasks", "nope"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown synthetic task" in bad.stderr
