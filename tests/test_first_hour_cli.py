"""What a user meets in a first hour with `mllm-cl`: a mistyped data path, a typo in an option, the help,
progress in a pipe and the training skip report. Real subprocesses, output through pipes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("MLLM_CL_DEBUG", None)
ENV.pop("MLLM_CL_PROGRESS_SECONDS", None)
COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}
MICRO = ["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/lora_ft.yaml")]


def _cli(*args, cwd=ROOT, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mllm_cl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, cwd=cwd)


def _error_line(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("mllm-cl: error: ")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def test_a_mistyped_benchmark_path_says_it_does_not_exist_and_suggests_synthesis_only_for_the_default(tmp_path):
    typo = tmp_path / "my_data" / "bench"
    line = _error_line(_cli("fit", *MICRO, "--data.benchmark", str(typo), "--trainer.default_root_dir",
                            str(tmp_path / "run")))
    assert f"data.benchmark: {typo} does not exist" in line
    assert "data synth" not in line
    (tmp_path / "empty").mkdir()
    line = _error_line(_cli("fit", *MICRO, "--data.benchmark", str(tmp_path / "empty"), "--trainer.default_root_dir",
                            str(tmp_path / "run")))
    assert f"data.benchmark: {tmp_path / 'empty'} has no benchmark.json" in line and "data synth" not in line
    # The synthetic benchmark's default path, relative to where the command runs: synthesis is the fix.
    line = _error_line(_cli("fit", *MICRO, "--data.benchmark", "data/synth", "--trainer.default_root_dir",
                            str(tmp_path / "run"), cwd=tmp_path))
    assert "data.benchmark: data/synth does not exist" in line
    assert "mllm-cl data synth --out data/synth" in line and "data.synthesize" in line
    assert not (tmp_path / "run").exists()


def test_skip_report_is_said_once_per_task_with_the_prefix_and_only_when_something_was_skipped(tmp_path, make_bench):
    (tmp_path / "bench").mkdir()
    bench = make_bench(tmp_path / "bench", COLOURS, train=12, test=3)
    train = json.loads((bench / "mood_train.json").read_text())
    train.insert(2, {**train[0], "id": "mood-missing", "image": "images/nowhere.png"})
    (bench / "mood_train.json").write_text(json.dumps(train))
    # routing: two phases per task (expert, gate), so a per-phase report would show twice.
    out = _cli("fit", "--config", str(ROOT / "configs/micro.yaml"),
               "--config", str(ROOT / "configs/methods/routing.yaml"),
               "--data.benchmark", str(bench), "--trainer.default_root_dir", str(tmp_path / "run"),
               "--data.on_bad_sample", "skip", "--model.method.init_args.gate_steps", "2",
               "--model.method.init_args.gate_batch", "null", "--model.method.init_args.gate_lr", "null",
               "--model.method.init_args.gate_warmup", "null")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("phase gate") == 2  # both tasks ran both phases
    assert "no samples skipped" not in out.stdout
    assert "task colour:" not in out.stdout  # nothing skipped in colour: nothing said
    assert out.stdout.count("mllm-cl: task mood: skipped 1 bad samples") == 1, out.stdout
    assert out.stdout.count("task mood: skipped") == 1
    report = out.stdout[out.stdout.index("mllm-cl: task mood: skipped"):]
    assert "1 x missing image" in report
    # said at the task's end: after its last phase began, before its evaluation
    assert out.stdout.rindex("task 2/2 mood: phase gate") < out.stdout.index("mllm-cl: task mood: skipped") \
        < out.stdout.index("mllm-cl: stage 02")


def _progress_problems(err: str, name: str) -> list[str]:
    return [f"{name}: {err.count(chr(13))} carriage returns"] if "\r" in err else []


def test_data_synth_shard_and_demo_print_progress_lines_not_redraws_into_a_pipe(tmp_path):
    out = _cli("data", "synth", "--out", str(tmp_path / "b"), "--tasks", "color", "count", "--train-size", "150",
               "--test-size", "20", "--image-size", "32")
    assert out.returncode == 0, out.stderr
    problems = _progress_problems(out.stderr, "synth")
    assert len(out.stderr.splitlines()) <= 1, out.stderr  # at most the bar's last line
    # Every interval a plain line (here 0 s: one per update at most), never a redraw.
    fast = {**ENV, "MLLM_CL_PROGRESS_SECONDS": "0"}
    out = _cli("data", "synth", "--out", str(tmp_path / "b2"), "--tasks", "color", "--train-size", "30",
               "--test-size", "5", "--image-size", "32", env=fast)
    assert out.returncode == 0, out.stderr
    problems += _progress_problems(out.stderr, "synth, interval 0")
    lines = out.stderr.splitlines()
    assert lines and all(line.startswith("synthetic benchmark") for line in lines), out.stderr
    assert "35/35" in lines[-1]
    out = _cli("data", "shard", "--input", str(tmp_path / "b/color/train.json"), "--out", str(tmp_path / "shards"),
               "--shard-size", "50")
    assert out.returncode == 0, out.stderr
    problems += _progress_problems(out.stderr, "shard")
    assert len(out.stderr.splitlines()) <= 1 and "sharding train.json" in out.stderr, out.stderr
    out = _cli("demo", "--steps", "30", "--experts", "2")
    assert out.returncode == 0, out.stderr
    problems += _progress_problems(out.stderr, "demo")
    assert len(out.stderr.splitlines()) <= 1, out.stderr
    assert not problems, problems


def test_a_typo_in_a_command_line_key_gets_the_same_suggestion_as_in_yaml(tmp_path):
    line = _error_line(_cli("fit", *MICRO, "--data.benchmark", "unused", "--model.learning_rate", "0.01"))
    assert "unknown option `--model.learning_rate`; did you mean `--model.lr`?" in line
    cfg = tmp_path / "lr.yaml"
    cfg.write_text("model:\n  learning_rate: 0.01\n")
    line = _error_line(_cli("fit", *MICRO, "--config", str(cfg), "--data.benchmark", "unused"))
    assert f"{cfg}: unknown key `model.learning_rate`; did you mean `model.lr`?" in line
    line = _error_line(_cli("fit", *MICRO, "--data.benchmark", "unused", "--data.batch-size", "4"))
    assert "did you mean `--data.batch_size`?" in line


def test_fit_help_says_beside_each_loop_owned_option_that_the_loop_sets_it():
    from mllm_cl.fit_options import LOOP_OWNED

    out = _cli("fit", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for key in LOOP_OWNED:
        start = text.index(f"--trainer.{key} ")
        block = text[start:text.index(" --trainer.", start + 1)]
        assert "Set by the loop for every phase (refused if given): " in block, block
        assert " ".join(LOOP_OWNED[key].split()) in block, block
    assert "Stop training after this number of steps" not in text
