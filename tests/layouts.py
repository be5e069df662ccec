"""Small copies of the built-in benchmarks' layouts (CoIN, UCIT, MLLM-DCL), for tests of any folder."""

import json

from PIL import Image

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
