"""The sequence under Lightning's ddp: 2 CPU processes (gloo) against 1 process with the same global batch.

Equal-length data (every answer and question the same length) makes each process's token-mean loss
average to the one process's; each task is one full batch per step, so sample order does not matter.
The runs are in float64: in float32 Adam's normalization turns the last-bit differences of a 2-way
gradient average into ~2e-5 after 3 steps (measured), in float64 they stay below 1e-8.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm_cl.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (210, 30, 30), "tan": (210, 180, 140), "sky": (30, 40, 210), "fir": (30, 140, 60)}
EXTRA = {"cmoe": ["--model.method.init_args.probe_steps", "2", "--model.method.init_args.vae_steps", "20",
                  # the balance loss is a per-process statistic under ddp (as in every data-parallel MoE)
                  "--model.method.init_args.balance_weight", "0"]}

EXTRA_ONE = {"routing": ["--model.method.init_args.gate_steps", "2", "--model.method.init_args.gate_batch", "null"],
             # an extension: no gates; each task's mean layer inputs summed over both processes' samples
             "routing:mean_activation": ["--model.method.init_args.route", "mean_activation",
                                         "--model.method.init_args.gate_steps", "0"]}


@pytest.fixture(scope="module")
def equal_bench(tmp_path_factory, make_bench):
    tasks = {"colour": ("What colour is it?", lambda c: c), "mood": ("How does it feel?", lambda c: c[::-1])}
    # 5 test samples: the two processes get 3 and 2
    return make_bench(tmp_path_factory.mktemp("eqbench"), COLOURS, tasks, train=8, test=5)


def _run(bench, run, method, *extra, check=True, env=None):
    method = method.partition(":")[0]  # "METHOD:EXTENSION": the method's config, the extension in EXTRA_ONE
    cmd = [sys.executable, "-m", "mllm_cl.cli", "fit", "--config", "configs/micro.yaml",
           "--config", f"configs/methods/{method}.yaml", "--data.benchmark", str(bench),
           "--trainer.default_root_dir", str(run), "--data.train_limit", "8", "--data.test_limit", "5",
           "--model.backbone_dtype", "float64", "--model.expert_dtype", "float64", *EXTRA.get(method, []), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.parametrize("method", [pytest.param("individual", marks=pytest.mark.slow), "cmoe", "cram", "routing",
                                    "routing:mean_activation"])
def test_two_processes_train_what_one_does(equal_bench, tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "ddp"
    _run(equal_bench, one, method, "--data.batch_size", "8", *EXTRA_ONE.get(method, []))
    meter = tmp_path / "broadcasts.jsonl"
    out = _run(equal_bench, two, method, "--data.batch_size", "4", "--trainer.strategy", "ddp",
               "--trainer.devices", "2", *EXTRA_ONE.get(method, []), "--trainer.callbacks+",
               "recording_callback.BroadcastMeter",
               env={"MLLM_CL_TEST_BROADCASTS": str(meter), "PYTHONPATH": str(Path(__file__).parent)})
    assert "GLOBAL_RANK: 1" in out.stderr + out.stdout  # two processes did run
    # The first wrap makes the processes' bases agree; later phases send only what they train.
    fits = [json.loads(line) for line in meter.read_text().splitlines()]
    for rank in (0, 1):
        mine = [f for f in fits if f["rank"] == rank]
        phases = json.loads((two / "results.json").read_text())["timings"]["tasks"]
        assert len(mine) == sum(len(t["phases"]) for t in phases) > 1
        assert mine[0]["sent"] == mine[0]["all"]
        assert all(f["sent"] == f["trainable"] < f["all"] for f in mine[1:]), mine
    assert out.stdout.count("mllm-cl: finished") == 1  # and only rank 0 talks
    for n in (1, 2):
        ckpt = f"checkpoints/task_{n:02d}"
        a, b = (json.loads((r / ckpt / "structure.json").read_text()) for r in (one, two))
        assert a["layers"] == b["layers"] and a.get("method_state") == b.get("method_state")
        x, y = load_file(one / ckpt / "adapters.safetensors"), load_file(two / ckpt / "adapters.safetensors")
        assert set(x) == set(y)
        worst = max((x[k].double() - y[k].double()).abs().max().item() for k in x)
        assert worst <= 1e-5, worst
        if method == "routing:mean_activation":  # the means: from the base alone, equal up to the summation order
            x, y = load_file(one / ckpt / "method.safetensors"), load_file(two / ckpt / "method.safetensors")
            assert set(x) == set(y)
            assert all(torch.allclose(x[k].double(), y[k].double(), atol=1e-9, rtol=1e-7) for k in x), ckpt
    results = [json.loads((r / "results.json").read_text()) for r in (one, two)]
    assert results[0]["matrix"] == results[1]["matrix"]
    # Evaluation scores every test sample exactly once, in dataset order, across both processes.
    for stage, tasks in ((0, ["colour", "mood"]), (1, ["colour"]), (2, ["colour", "mood"])):
        for task in tasks:
            rows = [json.loads(line) for line in
                    (two / f"predictions/stage_{stage:02d}/{task}.jsonl").read_text().splitlines()]
            assert [r["question_id"] for r in rows] == [f"{task}-q{i}" for i in range(5)]
            single = (one / f"predictions/stage_{stage:02d}/{task}.jsonl").read_text()
            assert [r["text"] for r in rows] == [json.loads(line)["text"] for line in single.splitlines()]
    if method == "individual":  # a refused resume stops every process (none waits for the others)
        again = _run(equal_bench, two, method, "--data.batch_size", "4", "--trainer.strategy", "ddp",
                     "--trainer.devices", "2", "--model.lr", "0.5", check=False)
        assert again.returncode != 0 and "refusing to resume" in again.stderr
    if method == "routing:mean_activation":  # each test prompt's choice counted once, the same as one process's
        assert set(results[1]["method_metrics"]["stage_02"]["mean_activation_accuracy"]) == {"colour", "mood"}
        assert results[1]["method_metrics"] == results[0]["method_metrics"]
    if method == "cmoe":  # the locator's hits are summed over processes: every test prompt located once
        assert results[1]["method_metrics"]["stage_02"]["locator_samples"] == {"colour": 5, "mood": 5}
        assert results[1]["method_metrics"] == results[0]["method_metrics"]


def test_test_rows_skipped_on_either_process_are_counted_once(tmp_path, make_bench):
    tasks = {"colour": ("What colour is it?", lambda c: c), "mood": ("How does it feel?", lambda c: c[::-1])}
    bench = make_bench(tmp_path, COLOURS, tasks, train=8, test=5)
    (bench / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    rows = json.loads((bench / "colour_test.json").read_text())
    rows[1]["image"] = "images/broken.png"  # index 1: the second process's share (indices 1, 3)
    (bench / "colour_test.json").write_text(json.dumps(rows))
    run = tmp_path / "ddp"
    out = _run(bench, run, "lora_ft", "--data.batch_size", "4", "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--data.on_bad_sample", "skip")
    assert out.stdout.count("colour=") == 3 and out.stdout.count("(over 4 of 5 rows; 1 skipped as bad)") == 3
    bad = json.loads((run / "results.json").read_text())["bad_samples"]["eval"]
    assert {stage: tasks["colour"]["skipped"] for stage, tasks in bad.items()} == {"stage_00": 1, "stage_01": 1,
                                                                                   "stage_02": 1}
    assert all(tasks["colour"]["scored"] == 4 for tasks in bad.values())


@pytest.mark.parametrize("strategy, why", [("fsdp", "sharded strategy"), ("deepspeed_stage_2", "sharded strategy"),
                                           ("ddp_spawn", "copied back non-strictly")])
def test_unsupported_strategies_fail_at_start_naming_both(tmp_path, strategy, why):
    with pytest.raises(ValueError, match=rf"method lora_ft cannot run under trainer.strategy '{strategy}': .*{why}"):
        fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/lora_ft.yaml"),
                  "--data.benchmark", str(tmp_path / "nothing-here"), "--trainer.strategy", strategy,
                  "--trainer.default_root_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_two_processes_train_the_gates_with_negatives_as_one_does(tmp_path, make_bench):
    """``gate_negatives: general``: the gate phase draws the task's and the general task's samples (answers of
    one length); each phase's data is one full batch per step, so one process and two see the same samples."""
    tasks = {"colour": ("What colour is it?", lambda c: c), "mood": ("How does it feel?", lambda c: c[::-1]),
             "hue": ("Name the hue.", lambda c: c.upper())}
    (tmp_path / "bench").mkdir()
    bench = make_bench(tmp_path / "bench", COLOURS, tasks, train=8, test=5)
    options = [*EXTRA_ONE["routing"], "--model.method.init_args.gate_negatives", "general", "--data.general", "[hue]"]
    one, two = tmp_path / "one", tmp_path / "ddp"
    _run(bench, one, "routing", "--data.batch_size", "16", *options)
    out = _run(bench, two, "routing", "--data.batch_size", "8", "--trainer.strategy", "ddp", "--trainer.devices", "2",
               *options)
    assert "GLOBAL_RANK: 1" in out.stderr + out.stdout
    for n in (1, 2):
        ckpt = f"checkpoints/task_{n:02d}/adapters.safetensors"
        x, y = load_file(one / ckpt), load_file(two / ckpt)
        gates = [k for k in x if ".gates." in k]
        assert gates and all(x[k].abs().sum() > 0 for k in gates if k.endswith(f"task{n - 1}"))
        worst = max((x[k].double() - y[k].double()).abs().max().item() for k in x)
        assert worst <= 1e-5, worst
