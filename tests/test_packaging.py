"""The repository's ``callbacks/`` and ``data_modules/`` are installed as ``mllm_cl.callbacks`` and
``mllm_cl.data_modules``: a user's own ``callbacks.py`` in the working directory does not stand in for them,
and the old top-level names still work, with a ``DeprecationWarning``. Real subprocesses and a built wheel."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("PYTHONPATH", None)  # as a user runs it: the installed package, from wherever they are
OWN = {"callbacks.py": "MINE = 'callbacks'\n", "data_modules.py": "MINE = 'data_modules'\n"}


def _python(code: str, cwd: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *options, "-c", code], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=ENV)


def test_a_callbacks_py_in_the_working_directory_does_not_shadow_the_framework(tmp_path):
    for name, text in OWN.items():
        (tmp_path / name).write_text(text)
    code = ("import mllm_cl.fit, callbacks, data_modules\n"
            "from mllm_cl.callbacks import ContinualCallback\n"
            "from mllm_cl.data_modules import TaskSequence\n"
            "assert mllm_cl.fit.ContinualCallback is ContinualCallback and mllm_cl.fit.TaskSequence is TaskSequence\n"
            "print(callbacks.MINE, data_modules.MINE)")
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["callbacks", "data_modules"]  # theirs stay theirs
    cli = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "fit", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env=ENV)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "--data.benchmark" in cli.stdout


def test_the_old_top_level_names_are_deprecated_aliases_of_the_same_modules(tmp_path):
    code = ("import warnings\n"
            "import mllm_cl\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from callbacks.cmoe import ProbeStatistics\n"
            "    from data_modules import TaskSequence\n"
            "import mllm_cl.callbacks.cmoe, mllm_cl.data_modules\n"
            "assert ProbeStatistics is mllm_cl.callbacks.cmoe.ProbeStatistics\n"
            "assert TaskSequence is mllm_cl.data_modules.TaskSequence\n"
            "import sys; assert sys.modules['callbacks.cmoe'] is mllm_cl.callbacks.cmoe\n"
            "print(sorted(str(w.message).split(' now')[0] for w in caught if w.category is DeprecationWarning))")
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == ("[\"the top-level package 'callbacks' is 'mllm_cl.callbacks'\", "
                                  "\"the top-level package 'data_modules' is 'mllm_cl.data_modules'\"]")
    # a config's old class path still builds (jsonargparse imports it by name)
    code = ("import warnings; warnings.simplefilter('ignore', DeprecationWarning)\n"
            "from jsonargparse import ArgumentParser\n"
            "import mllm_cl\n"
            "from mllm_cl.callbacks import ContinualCallback\n"
            "p = ArgumentParser(); p.add_argument('--cb', type=ContinualCallback)\n"
            "cfg = p.parse_args(['--cb', 'callbacks.ContinualCallback'])\n"
            "print(type(p.instantiate_classes(cfg).cb).__module__)")
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "mllm_cl.callbacks.base"


@pytest.mark.skipif(tomllib is None, reason="reads pyproject.toml with tomllib (Python 3.11)")
def test_the_package_list_names_every_package_folder():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mllm_cl").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert config["package-dir"] == {"mllm_cl.callbacks": "callbacks", "mllm_cl.data_modules": "data_modules"}
    assert sorted(config["packages"]) == sorted(folders | set(config["package-dir"]))


@pytest.mark.skipif(subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode,
                    reason="needs pip")
def test_the_wheel_holds_callbacks_and_data_modules_inside_the_package_only(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("mllm_cl", "callbacks", "data_modules"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                          "--wheel-dir", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True,
                         timeout=600, env=ENV, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("mllm_cl-*.whl"))).namelist()
    assert {"mllm_cl/callbacks/__init__.py", "mllm_cl/callbacks/cmoe.py", "mllm_cl/data_modules/__init__.py",
            "mllm_cl/data_modules/continual.py", "mllm_cl/_packages.py",
            "mllm_cl/assets/tiny-base/llm/config.json"} <= set(names)
    assert not [n for n in names if n.split("/")[0] in ("callbacks", "data_modules")]
