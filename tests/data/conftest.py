"""Hand-written sample files in the LLaVA layout, made fresh for each test."""

import json

import pytest
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
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "green"}]},
    ]
    shapes_test = [
        {"question_id": "q1", "image": "images/a.png", "text": "What colour is it?", "answer": "red"},
        {"question_id": "q2", "image": "images/b.png", "text": "<image>\nWhat colour is it?", "answer": ["blue", "navy"]},
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


# --------------------------------------------------------------------------- built-in benchmark layouts

# Two test rows per task: the answers each scorer compares against (as the benchmarks write them).
ANSWERS = {
    "coin_scienceqa": ["A", "B"], "coin_textvqa": ["stop", "exit"], "coin_imagenet": ["goldfish", "tabby cat"],
    "coin_gqa": ["left", "table"], "coin_vizwiz": ["red", "unanswerable"],
    "coin_grounding": ["[0.12, 0.20, 0.58, 0.64]", "[0.30, 0.10, 0.90, 0.70]"], "coin_vqav2": ["2", "yes"],
    "coin_ocrvqa": ["Fiction", "no"], "ucit_imagenet_r": ["goldfish", "hen"], "ucit_arxivqa": ["A", "C"],
    "ucit_vizwiz_caption": ["a red mug on a desk", "a blue door"], "ucit_iconqa": ["3", "B"],
    "ucit_clevr_math": ["4", "0"], "ucit_flickr30k": ["a dog runs on grass", "two men talk"],
    "mllm_dcl_rs": ["B", "A"], "mllm_dcl_med": ["yes", "no"], "mllm_dcl_ad": ["C", "D"], "mllm_dcl_sci": ["B", "A"],
    "mllm_dcl_fin": ["12", "b"],
}


def _picture(path, seed):
    """A small generated image (a coloured box on a background), PNG or JPEG by suffix."""
    from PIL import ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (36 + seed % 7, 28 + seed % 5), ((seed * 53) % 256, (seed * 97) % 256, 90))
    ImageDraw.Draw(image).rectangle([4, 4, 14 + seed % 9, 16], fill=(250 - seed % 200, 20, (seed * 31) % 256))
    image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
    return path


def write_benchmark(root, name):
    """Files in the layout of built-in benchmark ``name`` under ``root``: 3 training conversations (one text-only)
    and 2 test rows per task, generated images, TextVQA's and the captions' annotation files."""
    from mllm_cl.data.benchmarks import get_benchmark

    bench = get_benchmark(name)
    values = dict(bench.paths)
    seed = 0
    for t in bench.tasks:
        images = root / t.images.format(**values)
        images.mkdir(parents=True, exist_ok=True)
        prefix = "AI2D_" if t.scorer == "mllm_dcl_sci" else ""
        gold = ANSWERS[t.scorer]
        train, test = [], []
        for i in range(3):
            seed += 1
            rel = f"imgs/{t.name}/{prefix}train_{i}.{'jpg' if i % 2 else 'png'}"
            record = {"id": f"{t.name}-train-{i}",
                      "conversations": [{"from": "human", "value": f"Question {i} about {t.name}?"},
                                        {"from": "gpt", "value": gold[i % 2]}]}
            if i < 2:
                _picture(images / rel, seed)
                record["image"] = rel
                record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
            train.append(record)
        for i in range(2):
            seed += 1
            rel = f"imgs/{t.name}/{prefix}test_{i}.png"
            _picture(images / rel, seed)
            row = {"question_id": 100 + i, "image": rel, "text": f"Test question {i} about {t.name}?",
                   "answer": gold[i]}
            if t.scorer == "coin_grounding":
                row["answer_bbox"], row["size"] = gold[i], [40, 28]
            if t.scorer == "coin_scienceqa":
                row["text"] += "\nA. cat\nB. fish\nAnswer with the option's letter from the given choices directly."
            if t.annotation_format == "coco_captions":
                del row["answer"]  # the references are in the annotation file only
            if t.annotation_format == "textvqa":
                row["answer"] = "not the ten answers"  # the annotation's answers win, as in CoIN's script
            test.append(row)
        for rel, data in ((t.train[0], train), (t.test[0], test)):
            path = root / rel.format(**values)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
        if t.annotation_format == "textvqa":
            ann = {"data": [{"question_id": 100 + i, "answers": [gold[i]] * 10} for i in range(2)]}
        elif t.annotation_format == "coco_captions":
            ann = {"images": [{"id": i + 1, "file_name": f"test_{i}.png"} for i in range(2)],
                   "annotations": [{"image_id": i + 1, "id": 10 * i + k, "caption": c}
                                   for i in range(2) for k, c in enumerate([gold[i], gold[i] + " today"])]}
        else:
            continue
        path = root / t.annotation[0].format(**values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ann))
    return root


@pytest.fixture()
def gold_answers():
    """The answers ``write_benchmark`` gives the two test rows of a task, by the task's scorer."""
    return ANSWERS


@pytest.fixture()
def make_benchmark(tmp_path):
    """``make_benchmark(name)`` writes a small copy of benchmark ``name`` and returns its root."""
    return lambda name: write_benchmark(tmp_path / name, name)
