"""results.json's environment block: versions, CPU, threads, device and the code's git commit."""

import shutil
import subprocess

import pytest
import torch

from mllm_cl.system.environment import code_commit, environment, record_environment, summary


def test_the_block_names_what_decides_the_numbers():
    env = environment("cpu")
    assert set(env["packages"]) >= {"torch", "transformers", "lightning", "peft"}
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"] == torch.__version__
    assert env["python"].count(".") == 2 and env["device"] == "cpu" and env["threads"] == torch.get_num_threads()
    assert env["cpu"] and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "cuda" not in env
    line = summary(env)
    assert line.startswith("cpu (") and f"torch {env['packages']['torch']}" in line


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_of_a_checkout_and_of_a_plain_folder(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert code_commit(plain) == {"commit": None, "note": f"not a git checkout: {plain}"}
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert code_commit(repo) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert code_commit(repo) == {"commit": head, "dirty": True}
    assert "not a git checkout" in summary({**environment(), "code": code_commit(plain)})


def test_a_resumed_run_keeps_an_earlier_different_environment():
    results = {}
    record_environment(results)
    assert "earlier_environments" not in results
    record_environment(results)  # the same process again: nothing to keep
    assert "earlier_environments" not in results
    other = {**results["environment"], "threads": results["environment"]["threads"] + 7}
    results["environment"] = other
    record_environment(results)
    assert results["earlier_environments"] == [other] and results["environment"] != other
