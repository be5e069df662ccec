"""The CoIN-shaped synthetic suite: deterministic, split-clean, answers derived from what is drawn, scorable."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mllm_cl.data import real_images
from mllm_cl.data.draw import COLOURS
from mllm_cl.data.formats import load_conversations, load_test_records
from mllm_cl.data.synth import SUITES, TASKS, generate, sample
from mllm_cl.data.synth_coin import CHART_COLOURS, COIN_ORDER, DOMAINS, SIGN_WORDS, TITLES
from mllm_cl.data.tasks import load_manifest
from mllm_cl.eval.chance import best_constant
from mllm_cl.eval.rules import get_rule

COIN = list(SUITES["coin"])


def _digest(folder: Path, skip=()) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in skip:
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("coin")
    generate(out, suite="coin", train_size=60, test_size=30, seed=0, progress=False)
    return out


def test_the_shape_suite_is_byte_identical_to_generator_version_2(tmp_path):
    # The digest of every task file of the shapes suite (20 train, 10 test, seed 0) written by
    # generator version 2; later versions add suites and keep these files byte for byte.
    generate(tmp_path, train_size=20, test_size=10, seed=0, progress=False)
    assert _digest(tmp_path, skip={"benchmark.json"}) == \
        "32738cae3399b9d6b9fce58cce6f30f4d9129383a2424bc671bd6b486676d8f0"


def test_same_seed_same_bytes(bench, tmp_path):
    generate(tmp_path, suite="coin", train_size=60, test_size=30, seed=0, progress=False)
    assert _digest(bench) == _digest(tmp_path)
    generate(tmp_path / "s1", tasks=["imagenet"], train_size=60, test_size=30, seed=1, progress=False)
    assert (tmp_path / "s1/imagenet/train.json").read_bytes() != (bench / "imagenet/train.json").read_bytes()


def test_manifest_names_domains_scorers_and_sources(bench):
    manifest = json.loads((bench / "benchmark.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == COIN
    assert list(COIN_ORDER) == ["sciqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa"]
    domains = {t["name"]: t["domain"] for t in manifest["tasks"]}
    assert len({domains[t] for t in COIN_ORDER}) >= 4
    shared = Counter(domains[t] for t in COIN_ORDER)
    assert shared["shapes"] == 3  # gqa, grounding and vqav2 share one domain, as COCO in CoIN
    scorers = {t["scorer"] for t in manifest["tasks"] if t["name"] != "describe"}
    assert scorers == {f"coin_{n}" for n in COIN_ORDER} - {"coin_sciqa"} | {"coin_scienceqa"}
    sources = {s["domain"]: s for s in manifest["sources"]}
    assert "load_digits" in sources["digits"]["source"] and "CC BY 4.0" in sources["digits"]["licence"]
    assert "matplotlib" in sources["signs, covers"]["source"]
    tasks = load_manifest(bench)
    assert [t.scorer for t in tasks][:2] == ["coin_scienceqa", "coin_textvqa"]


def test_train_and_test_never_share_an_image_nor_a_digit(bench):
    for task in COIN:
        folder = bench / task / "images"
        train = {p.read_bytes() for p in folder.glob(f"{task}_train_*.png")}
        test = {p.read_bytes() for p in folder.glob(f"{task}_test_*.png")}
        assert train and test and not train & test, task
    train_digits = {sample("imagenet", "train", i).facts["digit_index"] for i in range(300)}
    test_digits = {sample("imagenet", "test", i).facts["digit_index"] for i in range(100)}
    assert not train_digits & test_digits
    assert all(i % real_images.TEST_EVERY == 0 for i in test_digits)


def test_every_gold_answer_scores_full_marks_in_both_modes(bench):
    for task in load_manifest(bench):
        if task.name == "describe":
            continue
        rule = get_rule(task.scorer)
        rows = json.loads(Path(task.test).read_text())
        for mode in ("official", "clean"):
            for row in rows:
                gold = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
                assert rule(gold, row, mode=mode) == 1.0, (task.name, mode, row)
        assert rule("zzz", rows[0], mode="clean") == 0.0


def test_records_load_in_the_user_formats(bench):
    for task in load_manifest(bench):
        conversations = load_conversations(task.train, task.image_root)
        records = load_test_records(task.test, task.image_root)
        assert len(conversations) == 60 and len(records) == 30
    rows = json.loads((bench / "textvqa/test.json").read_text())
    assert all(len(r["answer"]) == 10 and len(set(r["answer"])) == 1 for r in rows)  # ten agreeing annotators


def test_answers_follow_what_was_drawn():
    images, labels = real_images.digits()
    for i in range(60):
        s = sample("sciqa", "train", i)
        heights, bars = s.facts["heights"], s.facts["bars"]
        tallest = bars[int(np.argmax(heights))]
        assert s.facts["options"]["ABCD".index(s.answer)] == tallest
        assert max(heights) >= 1.4 * sorted(heights)[-2]
        assert f"{s.answer}. {tallest}" in s.instruction and set(bars) <= set(CHART_COLOURS)
        # above every other bar's top (55% of the plot) and below the tallest's (80%) only the tallest is drawn
        band = np.asarray(s.image)[12:20].reshape(-1, 3)
        assert {c for c in CHART_COLOURS if (band == COLOURS[c]).all(-1).any()} == {tallest}
        s = sample("imagenet", "test", i)
        assert s.answer == real_images.DIGIT_NAMES[labels[s.facts["digit_index"]]]
        s = sample("vizwiz", "train", i)
        unseen = s.facts["object"] is None or s.facts["hopeless"]
        assert (s.answer == "unanswerable") == unseen
        if not unseen:
            assert s.answer == s.facts["object"][1]
        s = sample("grounding", "train", i)
        target = [o for o in s.objects if f"the {o.colour} {o.shape}." in s.instruction]
        assert len(target) == 1
        box = [float(v) * 48 for v in s.answer.strip("[]").split(", ")]
        assert np.allclose(box, target[0].box(), atol=0.25)
        assert sample("textvqa", "test", i).answer in SIGN_WORDS and sample("ocrvqa", "test", i).answer in TITLES


def test_dark_photos_are_dark_and_hopeless_ones_darker():
    seen, hopeless = [], []
    for i in range(200):
        s = sample("vizwiz", "train", i)
        (hopeless if s.facts["hopeless"] else seen).append(np.asarray(s.image).mean())
    assert hopeless and max(hopeless) < min(seen) and max(seen) < 160


def test_describe_covers_every_domain_evenly():
    counts = Counter(sample("describe", "train", i).facts["domain"] for i in range(600))
    assert set(counts) == set(DOMAINS) and min(counts.values()) > 60


def test_answers_are_balanced():
    for task, top in (("sciqa", 0.35), ("textvqa", 0.2), ("imagenet", 0.2), ("gqa", 0.25), ("vizwiz", 0.35),
                      ("vqav2", 0.3), ("ocrvqa", 0.2)):
        counts = Counter(sample(task, "train", i).answer for i in range(400))
        assert max(counts.values()) / 400 < top, (task, counts.most_common(3))


def test_best_constant_answer():
    rows = [{"question_id": str(i), "answer": a} for i, a in enumerate(["red", "red", "blue", "green"])]
    assert best_constant(rows, "exact_match") == ("red", 50.0)
    boxes = [{"question_id": "a", "answer": "[0.1, 0.1, 0.5, 0.5]", "answer_bbox": "[0.1, 0.1, 0.5, 0.5]",
              "size": [48, 48]}, {"question_id": "b", "answer": "[0.5, 0.5, 0.9, 0.9]",
                                  "answer_bbox": "[0.5, 0.5, 0.9, 0.9]", "size": [48, 48]}]
    assert best_constant(boxes, "coin_grounding", mode="clean") == ("[0.1, 0.1, 0.5, 0.5]", 50.0)
    with pytest.raises(ValueError, match="no test rows"):
        best_constant([], "exact_match")


def test_without_scikit_learn_the_error_names_the_extra(monkeypatch):
    import sys

    real_images.digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match=r"mllm-cl\[coin\]"):
            sample("imagenet", "train", 0)
        sample("gqa", "train", 0)  # the drawn domains need nothing more
    finally:
        real_images.digits.cache_clear()


def test_suite_and_tasks_are_exclusive_and_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown suite"):
        generate(tmp_path, suite="nope", progress=False)
    with pytest.raises(ValueError, match="not both"):
        generate(tmp_path, suite="coin", tasks=["gqa"], progress=False)
    assert set(COIN) <= set(TASKS) and "caption" not in COIN


def test_the_smallest_image_size_works(tmp_path):
    generate(tmp_path, suite="coin", train_size=30, test_size=5, image_size=32, progress=False)
    assert load_manifest(tmp_path)[0].name == "sciqa"


def test_cli_writes_the_coin_suite_and_lists_it(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "data", "synth", "--out", str(tmp_path / "b"),
                          "--suite", "coin", "--train-size", "4", "--test-size", "2", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"wrote {len(COIN)} tasks (sciqa, textvqa," in out.stdout
    listed = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "data", "synth", "--list"],
                            capture_output=True, text=True, env=env, timeout=120).stdout
    assert "imagenet   suite=coin    domain=digits" in listed and "color      suite=shapes  domain=shapes" in listed
    both = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "data", "synth", "--out", str(tmp_path / "c"),
                           "--suite", "coin", "--tasks", "gqa"], capture_output=True, text=True, env=env, timeout=120)
    assert both.returncode == 2 and "not both" in both.stderr
