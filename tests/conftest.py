import os

# A stray hub id must fail at once instead of retrying for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json

import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: The two tasks most tests use: name the colour; a "mood" word made from it.
TWO_TASKS = {"colour": ("What colour is it?", lambda c: c), "mood": ("How does it feel?", lambda c: f"{c[0]}{c[0]}")}
#: Those two and a third, ``hue``, for runs that keep it as a general task (``--data.general [hue]``).
GENERAL_TASKS = {**TWO_TASKS, "hue": ("Name the hue.", lambda c: f"a {c} hue")}


def write_bench(root, colours: dict, tasks: dict | None = None, *, train: int, test: int):
    """One image per colour; per task ``(question, answer(colour name))`` (default ``TWO_TASKS``),
    ``train`` / ``test`` samples."""
    tasks = TWO_TASKS if tasks is None else tasks
    (root / "images").mkdir()
    names = list(colours)
    for name, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{name}.png")
    for task, (question, answer) in tasks.items():
        rows = [{"id": f"{task}{i}", "image": f"images/{names[i % len(names)]}.png",
                 "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                   {"from": "gpt", "value": answer(names[i % len(names)])}]} for i in range(train)]
        tests = [{"question_id": f"{task}-q{i}", "image": f"images/{names[i % len(names)]}.png", "text": question,
                  "answer": answer(names[i % len(names)])} for i in range(test)]
        (root / f"{task}_train.json").write_text(json.dumps(rows))
        (root / f"{task}_test.json").write_text(json.dumps(tests))
    manifest = {"tasks": [{"name": t, "train": f"{t}_train.json", "test": f"{t}_test.json", "image_root": ".",
                           "scorer": "exact_match", "max_new_tokens": 4} for t in tasks]}
    (root / "benchmark.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def make_bench():
    """``write_bench``: a small benchmark in the manifest layout, for tests that need their own."""
    return write_bench


@pytest.fixture(scope="session")
def general_bench(tmp_path_factory):
    """Three colours, ``GENERAL_TASKS`` (12 training and 3 test samples each): written once per session."""
    colours = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}
    return write_bench(tmp_path_factory.mktemp("general"), colours, GENERAL_TASKS, train=12, test=3)


@pytest.fixture(scope="session")
def fit_general(general_bench):
    """``fit_general(run, method, *options)``: a micro ``mllm-cl fit`` of a method config on ``general_bench``
    with ``hue`` as its general task (exact match and token F1), in-process; its results.json."""
    from pathlib import Path

    from mllm_cl.fit import main as fit_main

    configs = Path(__file__).resolve().parents[1] / "configs"

    def fit(run, method, *options):
        fit_main(["--config", str(configs / "micro.yaml"), "--config", str(configs / f"methods/{method}.yaml"),
                  "--data.benchmark", str(general_bench), "--trainer.default_root_dir", str(run),
                  "--data.general", "[hue]", "--data.general_scorers", "[exact_match, token_f1]", *options])
        return json.loads((Path(run) / "results.json").read_text())
    return fit


class _Records(list):
    def handle(self, record):  # the least a logging handler needs
        self.append(record)

    level = 0


@pytest.fixture
def no_future_warnings():
    """Inside the test, a ``FutureWarning`` is an error, and transformers' own deprecation log lines
    (``past_key_values`` ... ``Use cache instead``, logged once per process) are collected and
    asserted absent at the end."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    clear = getattr(getattr(hf_logging, "warning_once", None), "cache_clear", None)
    if clear is not None:  # logged once per process: forget earlier tests' lines
        clear()
    records, logger = _Records(), logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            yield
    finally:
        logger.removeHandler(records)
    deprecations = [r.getMessage() for r in records if "deprecated" in r.getMessage()]
    assert not deprecations, deprecations
