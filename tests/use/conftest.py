"""Finished micro runs (two tasks, a few steps each), made once per session and shared by the tests of
``mllm-cl predict`` and ``mllm-cl export``."""

import json
from pathlib import Path

import pytest

from mllm_cl.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}
EXTRA = {"routing": ["--model.method.init_args.gate_steps", "2", "--model.method.init_args.gate_batch", "null"],
         "cmoe": ["--model.method.init_args.probe_steps", "2", "--model.method.init_args.vae_steps", "20"]}


@pytest.fixture(scope="session")
def use_bench(tmp_path_factory, make_bench):
    return make_bench(tmp_path_factory.mktemp("bench"), COLOURS, train=12, test=3)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, use_bench):
    """``micro_run(method, backbone_path=None)``: the run directory of a finished micro run of that method config
    (on the tiny preset, or on the transformers checkpoint at ``backbone_path``)."""
    runs: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(method: str, backbone_path: Path | None = None) -> Path:
        key = (method, backbone_path)
        if key not in runs:
            run = root / f"{method}-{len(runs)}"
            backbone = [] if backbone_path is None else ["--model.backbone_path", str(backbone_path)]
            fit_main(["--config", str(ROOT / "configs/micro.yaml"),
                      "--config", str(ROOT / f"configs/methods/{method}.yaml"),
                      "--data.benchmark", str(use_bench), "--trainer.default_root_dir", str(run),
                      *EXTRA.get(method, []), *backbone])
            assert json.loads((run / "results.json").read_text())["completed_tasks"] == 2
            runs[key] = run
        return runs[key]

    return get
