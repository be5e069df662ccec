"""What a run ran on, for ``results.json``: versions, CPU, threads, device and the code's git commit.

Two runs with the same config and seed give the same matrix only where the floating-point work
is the same, and on a CPU that depends on more than the seed (docs/usage.md, "Reproducibility"): the
CPU's kernel set (ATen dispatches AVX2 or AVX-512 code; MKL picks its GEMM kernels per CPU
unless ``MKL_CBWR`` pins them), the number of threads (it splits reductions differently), and
the library versions. ``environment()`` records all of them so two runs can be compared, and
``record_environment`` keeps the earlier attempts' environments when a resumed run's differs.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "lightning", "peft", "numpy")
#: Variables that change which kernels run or how many threads they use.
KERNEL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                    "CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_commit(where: Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding the code, or ``{"commit": None, "note"}``
    when the code is not in one (an installed wheel, a copied folder) or git is missing."""
    where = where or Path(__file__).resolve().parents[1]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        return {"commit": None, "note": "git is not installed"}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        return {"commit": None, "note": f"not a git checkout: {where}"}
    return {"commit": commit, "dirty": dirty}


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The environment block of ``results.json``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "variables": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ},
        "device": str(device),
        "code": code_commit(),
    }
    if device.type == "cuda":
        env["cuda"] = {"device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version()}
    return env


def summary(env: dict[str, Any]) -> str:
    """One line: ``cpu (AMD EPYC, AVX512, 2 threads) · torch 2.14.1 · transformers 5.24.0 · code 1a2b3c4``."""
    where = env["cuda"]["device_name"] if "cuda" in env else f"{env['cpu']}, {env['cpu_capability']}"
    code = env["code"]
    commit = f"code {code['commit'][:7]}{'+' if code.get('dirty') else ''}" if code.get("commit") else code["note"]
    packages = env["packages"]
    threads = f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
    return " · ".join([f"{env['device']} ({where}, {threads})",
                       *(f"{p} {packages[p]}" for p in ("torch", "transformers", "lightning") if packages.get(p)),
                       commit])


def record_environment(results: dict[str, Any], device=None) -> str:
    """Put this process's environment into ``results["environment"]``; a resumed run whose
    environment differs keeps the earlier one(s) in ``results["earlier_environments"]`` (the
    matrix then mixes both). Returns the one-line summary."""
    now = environment(device)
    before = results.get("environment")
    if before is not None and before != now:
        results.setdefault("earlier_environments", []).append(before)
    results["environment"] = now
    return summary(now)
