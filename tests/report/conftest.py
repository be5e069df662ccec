from pathlib import Path

import pytest

from mllm_cl.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_bench):
    """A finished micro ``routing`` run (two tasks, a few gate steps), one per test module."""
    bench = make_bench(tmp_path_factory.mktemp("bench"), COLOURS, train=12, test=3)
    run = tmp_path_factory.mktemp("runs") / "routing"
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/routing.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run),
              "--model.method.init_args.gate_steps", "3", "--model.method.init_args.gate_batch", "null"])
    return run
