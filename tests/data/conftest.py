"""Hand-written sample files in the LLaVA layout, made fresh for each test."""

import json

import pytest
from layouts import ANSWERS, write_benchmark
from PIL import Image


def write_image(path, colour=(200, 30, 30), size=(40, 28)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture()
def llava_dir(tmp_path):
    """Two tasks, images under images/, a multi-turn and a text-only conversation."""
    root = tmp_path / "data"
    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200)), ("c.png", (30, 200, 30))):
        write_image(root / "images" / name, colour)
    shapes_train = [
        {"id": "s1", "image": "images/a.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
                           {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "s2", "image": "images/b.png",
         "conversations": [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "s3", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
        {"id": "s4", "image": "images/c.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                           {"from": "gpt", "value": "green"}]},
    ]
    shapes_test = [
        {"question_id": "q1", "image": "images/a.png", "text": "What colour is it?", "answer": "red"},
        {"question_id": "q2", "image": "images/b.png", "text": "<image>\nWhat colour is it?",
         "answer": ["blue", "navy"]},
        {"question_id": "q3", "text": "Say hi.", "answer": "hi"},
    ]
    ground_test = [
        {"question_id": "g1", "image": "images/c.png", "text": "Where is it?", "answer": "[0.1, 0.2, 0.5, 0.6]",
         "answer_bbox": "[0.1, 0.2, 0.5, 0.6]", "size": [40, 28]},
    ]
    (root / "colour_train.json").write_text(json.dumps(shapes_train))
    (root / "colour_test.json").write_text(json.dumps(shapes_test))
    (root / "ground_train.json").write_text(json.dumps(shapes_train[:2]))
    (root / "ground_test.jsonl").write_text("\n".join(json.dumps(r) for r in ground_test) + "\n")
    return root


@pytest.fixture()
def gold_answers():
    """The answers ``write_benchmark`` gives the two test rows of a task, by the task's scorer."""
    return ANSWERS


@pytest.fixture()
def make_benchmark(tmp_path):
    """``make_benchmark(name)`` writes a small copy of benchmark ``name`` and returns its root."""
    return lambda name: write_benchmark(tmp_path / name, name)
