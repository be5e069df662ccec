"""The synthetic benchmark's two separability knobs: the instruction before the image, a per-task image tint."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_cl.backbones import build_preset
from mllm_cl.cli import main as cli
from mllm_cl.data.encoding import ConversationEncoder
from mllm_cl.data.formats import load_conversations, load_test_records
from mllm_cl.data.synth import ensure, generate, tint_colours, tint_image

TASKS = ["color", "ocr", "caption"]


def _digest(folder: Path) -> str:
    """Every file under ``folder``, the manifest included: names and bytes."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _mean_colour(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    generate(out, tasks=TASKS, train_size=6, test_size=3, seed=0, progress=False)
    return out


def test_with_the_knobs_off_every_file_is_what_the_generator_wrote_before_them(tmp_path):
    # Digests of every file, benchmark.json included, written by the generator before the knobs existed.
    generate(tmp_path / "a", train_size=6, test_size=3, seed=0, progress=False)
    assert _digest(tmp_path / "a") == "bbc39ff49183bcb61e389edf3ad1b5a7a54cbedb2c0916188eb693d2777ef9f4"
    generate(tmp_path / "b", tasks=["sciqa", "imagenet", "textvqa", "describe"], train_size=4, test_size=2, seed=1,
             image_size=40, progress=False)
    assert _digest(tmp_path / "b") == "0249a3b1bd00083e197b1c71ae57ef9852df680727e517dbec91111bc23da9ba"
    # The command with its defaults writes the same, and so do the knobs given their off values.
    assert cli(["data", "synth", "--out", str(tmp_path / "c"), "--train-size", "6", "--test-size", "3",
                "--quiet"]) == 0
    assert _digest(tmp_path / "c") == _digest(tmp_path / "a")
    generate(tmp_path / "d", train_size=6, test_size=3, seed=0, instruction_first=False, tint=0.0, progress=False)
    assert _digest(tmp_path / "d") == _digest(tmp_path / "a")


def test_instruction_first_puts_the_question_before_the_image_and_changes_nothing_else(plain, tmp_path):
    generate(tmp_path, tasks=TASKS, train_size=6, test_size=3, seed=0, instruction_first=True, progress=False)
    for task in TASKS:
        before = json.loads((plain / task / "train.json").read_text())
        after = json.loads((tmp_path / task / "train.json").read_text())
        for old, new in zip(before, after, strict=True):
            question = old["conversations"][0]["value"].removeprefix("<image>\n")
            assert new["conversations"][0]["value"] == f"{question}\n<image>"
            assert new["conversations"][1] == old["conversations"][1] and new["image"] == old["image"]
        rows = json.loads((tmp_path / task / "test.json").read_text())
        assert all(r["text"].endswith("\n<image>") and r["text"].count("<image>") == 1 for r in rows)
        images = sorted((tmp_path / task / "images").iterdir())
        assert [p.read_bytes() for p in images] == [(plain / task / "images" / p.name).read_bytes() for p in images]
    manifest = json.loads((tmp_path / "benchmark.json").read_text())
    assert manifest["instruction_first"] is True and "tint" not in manifest

    # The loaders keep the placeholder where it stands, and the encoder puts the image tokens after the question.
    conv = load_conversations(tmp_path / "color" / "train.json", tmp_path / "color")[0]
    assert conv.turns[0][1].endswith("\n<image>") and not conv.turns[0][1].startswith("<image>")
    record = load_test_records(tmp_path / "color" / "test.json", tmp_path / "color")[0]
    assert record.prompt.endswith("\n<image>")
    backbone = build_preset("tiny-clip-llama")
    tok = backbone.tokenizer
    ids = ConversationEncoder(tok, num_image_tokens=backbone.model.num_image_tokens,
                              template="short").encode_conversation(conv).input_ids
    first_image = ids.index(tok.image_token_id)
    assert ids.count(tok.image_token_id) == backbone.model.num_image_tokens
    assert tok.decode(ids[:first_image]).endswith(conv.turns[0][1].removesuffix("\n<image>") + "\n")


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_tint_moves_each_tasks_mean_colour_toward_its_own_colour_in_proportion(plain, tmp_path, strength):
    generate(tmp_path, tasks=TASKS, train_size=6, test_size=3, seed=0, tint=strength, progress=False)
    colours = tint_colours(TASKS)
    manifest = json.loads((tmp_path / "benchmark.json").read_text())
    assert manifest["tint"] == strength and "instruction_first" not in manifest
    assert {t["name"]: tuple(t["tint_colour"]) for t in manifest["tasks"]} == colours
    for task in TASKS:
        for split, n in (("train", 6), ("test", 3)):
            for i in range(n):
                name = f"{task}_{split}_{i:05d}.png"
                before = _mean_colour(plain / task / "images" / name)
                after = _mean_colour(tmp_path / task / "images" / name)
                want = (1 - strength) * before + strength * np.asarray(colours[task])
                assert np.abs(after - want).max() <= 0.5  # rounding per pixel
        # Only the images change.
        assert (tmp_path / task / "train.json").read_bytes() == (plain / task / "train.json").read_bytes()


def test_tint_colours_are_distinct_fixed_and_zero_strength_is_the_image_itself():
    colours = tint_colours(TASKS)
    assert len(set(colours.values())) == len(TASKS) and colours["color"] == (255, 0, 0)
    assert tint_colours(TASKS) == colours and len(set(tint_colours([f"t{i}" for i in range(8)]).values())) == 8
    image = Image.new("RGB", (4, 4), (10, 200, 30))
    assert tint_image(image, (255, 0, 0), 0.0) is image
    assert np.asarray(tint_image(image, (255, 0, 0), 1.0)).reshape(-1, 3).tolist() == [[255, 0, 0]] * 16
    assert np.asarray(tint_image(image, (250, 0, 0), 0.5))[0, 0].tolist() == [130, 100, 15]


def test_ensure_regenerates_when_a_knob_differs_and_keeps_a_folder_written_with_them_off(plain, tmp_path, caplog):
    args = {"tasks": TASKS, "train_size": 6, "test_size": 3, "seed": 0, "progress": False}
    # A manifest without the knobs was written with them off: the folder is kept.
    assert ensure(plain, **args) is False and ensure(plain, **args, instruction_first=False, tint=0) is False
    out = tmp_path / "b"
    assert ensure(out, **args, tint=0.5) is True
    assert ensure(out, **args, tint=0.5) is False
    assert ensure(out, **args, tint=0.5, instruction_first=True) is True
    assert "instruction_first differ" in caplog.text
    assert ensure(out, **args) is True and "instruction_first, tint differ" in caplog.text
    assert _digest(out) == _digest(plain)


@pytest.mark.parametrize("tint", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_a_tint_outside_zero_to_one_is_refused(tmp_path, tint):
    with pytest.raises(ValueError, match="tint must be a number in"):
        generate(tmp_path, tasks=["color"], train_size=1, test_size=1, tint=tint, progress=False)


def test_the_command_takes_both_knobs_and_refuses_a_bad_tint(tmp_path, capsys):
    assert cli(["data", "synth", "--out", str(tmp_path / "k"), "--tasks", "color", "--train-size", "2",
                "--test-size", "1", "--instruction-first", "--tint", "0.3", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "k" / "benchmark.json").read_text())
    assert manifest["instruction_first"] is True and manifest["tint"] == 0.3
    assert cli(["data", "synth", "--out", str(tmp_path / "bad"), "--tint", "2", "--quiet"]) == 2
    assert "tint must be a number in [0, 1]" in capsys.readouterr().err
