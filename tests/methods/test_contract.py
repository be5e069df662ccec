"""Contract suite: every continual-learning method in mllm_cl obeys the same rules.

Each method runs a real two-task ``mllm-cl fit`` (the micro experiment, its ``configs/methods``
YAML, a few steps per phase) with a callback that records what the continual loop leaves after
each hook; then:

- replaying the task hooks rebuilds the same model: the run restored at stage 1 and 2 as a resumed
  run rebuilds it (``load_state``, then ``on_task_start`` / ``on_task_end`` per finished task, then
  the checkpoint's weights) has the parameters, buffers, modules, experts and routers, and the
  adapter values, that the live model had when that task ended;
- ``state()`` round-trips: a fresh instance given a checkpoint's saved state by ``load_state``
  gives back the same facts and tensors, and so does the method of a restored run;
- after every phase starts only expert and router parameters train (names with ``.experts.`` or
  ``.routers.``, what ``results.json``'s parameter counts call experts and routers), and something
  does.

The methods come from the package (every ``Method`` subclass in ``mllm_cl.methods`` and every
``configs/methods`` YAML), so a new method joins the suite by itself; it must also be added to
``EXPECTED`` below (with the options that keep its fit short), or ``test_every_method_is_listed``
fails. ``examples/custom_method`` runs through the same checks.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from mllm_cl.callbacks import ContinualCallback

import mllm_cl.methods as methods_pkg
from mllm_cl.fit import main as fit_main
from mllm_cl.methods import Method
from mllm_cl.system.restore import restore
from mllm_cl.system.run_dir import RunDir, adapter_state, structure

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs/micro.yaml"
EXAMPLE = ROOT / "examples/custom_method"
TASKS = 2

#: Every method the suite expects, with the fit options that keep its phases to a step or two.
EXPECTED: dict[str, list[str]] = {
    "zero_shot": [],
    "lora_ft": [],
    "moelora": [],
    "multitask": [],
    "individual": [],
    "routing": ["--model.method.init_args.gate_steps", "2", "--model.method.init_args.gate_batch", "null"],
    "cmoe": ["--model.method.init_args.probe_steps", "2"],
    "same": ["--model.method.init_args.warmup_steps", "1", "--model.method.init_args.refresh_every", "2"],
    "cram": [],
}
#: Every case keeps ``hue`` as the general task: scored at every stage, and data for the extensions that train on it.
GENERAL = ["--data.general", "[hue]"]
#: A method's extensions run through the same checks: "METHOD:NAME" -> the fit options that select it.
EXTENSIONS: dict[str, list[str]] = {
    "routing:mean_activation": ["--model.method.init_args.route", "mean_activation",
                                "--model.method.init_args.null_expert", "true",
                                "--model.method.init_args.gate_steps", "0"],
    "routing:gate_negatives": [*EXPECTED["routing"], "--model.method.init_args.gate_negatives", "general"],
}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _method_classes() -> dict[str, type[Method]]:
    """Every ``Method`` subclass defined in ``mllm_cl.methods``'s modules, by its ``name``."""
    for module in pkgutil.iter_modules(methods_pkg.__path__):
        importlib.import_module(f"{methods_pkg.__name__}.{module.name}")
    return {c.name: c for c in _subclasses(Method) if c.__module__.startswith("mllm_cl.")}


def _config_class(path: Path) -> type:
    class_path = yaml.safe_load(path.read_text())["model"]["method"]["class_path"]
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


CLASSES = _method_classes()
CONFIGS = {p.stem: p for p in sorted((ROOT / "configs/methods").glob("*.yaml"))}
REGISTERED = sorted(set(CLASSES) | set(CONFIGS))
#: (method config, fit options) per case: the registered methods, and the example's method.
CASES = {**{name: (CONFIGS.get(name), EXPECTED.get(name, [])) for name in REGISTERED},
         **{name: (CONFIGS.get(name.partition(":")[0]), options) for name, options in EXTENSIONS.items()},
         "example:warm_start": (EXAMPLE / "config.yaml", [])}


def test_every_method_is_listed():
    missing, stale = set(REGISTERED) - set(EXPECTED), set(EXPECTED) - set(REGISTERED)
    assert not missing, (f"methods missing from the contract suite: {sorted(missing)}; add each to EXPECTED in "
                         f"{Path(__file__).relative_to(ROOT)} (with fit options that keep its phases short)")
    assert not stale, f"EXPECTED names methods the package no longer has: {sorted(stale)}; remove them"


def test_every_method_has_its_config():
    for name, cls in CLASSES.items():
        assert name in CONFIGS, f"{cls.__qualname__} (name {name!r}) has no configs/methods/{name}.yaml"
        assert _config_class(CONFIGS[name]) is cls, f"configs/methods/{name}.yaml does not select {cls.__qualname__}"
    for name, path in CONFIGS.items():
        assert issubclass(_config_class(path), Method) and _config_class(path).name == name, path


# ------------------------------------------------------------------------------ one real fit per method
def _model_structure(model: torch.nn.Module) -> dict:
    """What a rebuilt model must match: parameter and buffer names and shapes, the module tree, and
    each expert layer's experts (with ranks) and routers (with the experts each covers, in order)."""
    return {"parameters": {n: tuple(p.shape) for n, p in model.named_parameters()},
            "buffers": {n: tuple(b.shape) for n, b in model.named_buffers()},
            "modules": [(n, type(m).__qualname__) for n, m in model.named_modules()],
            "experts": structure(model)}


#: The probes the fits made (a fit builds its callbacks from their class path).
PROBES: list = []


class _Probe(ContinualCallback):
    """What the loop left after each phase start (the trainable parameters) and task end (the model)."""

    def __init__(self) -> None:
        PROBES.append(self)
        self.module = None
        self.phases: list[tuple[int, str, list[str]]] = []
        self.task_ends: dict[int, tuple[dict, dict]] = {}

    def on_phase_start(self, module, task: int, phase) -> None:
        self.module = module
        self.phases.append((task, phase.name, [n for n, p in module.named_parameters() if p.requires_grad]))

    def on_task_end(self, module, task: int) -> None:
        self.module = module
        values = {k: v.clone() for k, v in adapter_state(module.model).items()}  # not views of what trains on
        self.task_ends[task] = (_model_structure(module.model), values)


@dataclass
class Fitted:
    name: str
    run: Path
    probe: _Probe
    stages: dict = field(default_factory=dict)

    def restored(self, stage: int):
        """The run's module rebuilt at ``stage`` as a resume rebuilds it (kept: the checks only read it)."""
        if stage not in self.stages:
            self.stages[stage] = restore(self.run, stage).module
        return self.stages[stage]


@pytest.fixture(scope="module")
def bench(general_bench):
    return general_bench  # two tasks and ``hue``, the general task (GENERAL)


@pytest.fixture(scope="module", params=list(CASES))
def fitted(request, bench, tmp_path_factory):
    name = request.param
    if not name.startswith("example:") and name not in EXPECTED and name not in EXTENSIONS:
        pytest.fail(f"method {name!r} is not in EXPECTED of {Path(__file__).relative_to(ROOT)}: add it there")
    config, options = CASES[name]
    if config is None:
        pytest.fail(f"method {name!r} has no configs/methods/{name}.yaml to run it with")
    if name.startswith("example:"):
        sys.path.insert(0, str(EXAMPLE))  # as the example's README puts it on PYTHONPATH
    run = tmp_path_factory.mktemp(name.replace(":", "_")) / "run"
    PROBES.clear()
    try:
        fit_main(["--config", str(MICRO), "--config", str(config), "--data.benchmark", str(bench), *GENERAL,
                  "--trainer.default_root_dir", str(run), "--trainer.callbacks+", f"{__name__}._Probe", *options])
        assert json.loads((run / "results.json").read_text())["completed_tasks"] == TASKS
        assert len(PROBES) == 1
        yield Fitted(name, run, PROBES[0])
    finally:
        if name.startswith("example:"):
            sys.path.remove(str(EXAMPLE))


def _assert_same_state(got: tuple[dict, dict], want: tuple[dict, dict], what: str) -> None:
    """(facts, tensors) equal as a checkpoint stores them (facts through JSON, tensors exactly)."""
    (facts, tensors), (want_facts, want_tensors) = got, want
    assert json.loads(json.dumps(facts)) == json.loads(json.dumps(want_facts)), f"{what}: the facts differ"
    assert sorted(tensors) == sorted(want_tensors), f"{what}: the tensors' names differ"
    for key, value in tensors.items():
        expected = want_tensors[key]
        assert value.dtype == expected.dtype and value.shape == expected.shape, (what, key)
        assert torch.equal(value.detach().cpu(), expected.cpu()), f"{what}: tensor {key} differs"


# ------------------------------------------------------------------------------------------- the checks
def test_replaying_the_task_hooks_rebuilds_the_same_model(fitted):
    assert sorted(fitted.probe.task_ends) == list(range(TASKS))
    for stage in range(1, TASKS + 1):
        rebuilt = fitted.restored(stage).model  # load_state, the hooks replayed, the checkpoint loaded
        live, live_values = fitted.probe.task_ends[stage - 1]
        now = _model_structure(rebuilt)
        for part in ("experts", "parameters", "buffers", "modules"):
            assert now[part] == live[part], f"{fitted.name}: stage {stage}: replayed {part} differ from the live run's"
        values = adapter_state(rebuilt)
        assert sorted(values) == sorted(live_values)
        changed = [k for k in values if not torch.equal(values[k], live_values[k])]
        assert not changed, f"{fitted.name}: stage {stage}: rebuilt values differ: {changed[:5]}"


def test_state_round_trips(fitted):
    run, method = RunDir(fitted.run), fitted.probe.module.method
    saved = {stage: run.method_state(stage) for stage in range(1, TASKS + 1)}
    _assert_same_state(method.state(), saved[TASKS], f"{fitted.name}: the live state against its checkpoint's")
    for stage, state in saved.items():
        fresh = restore(fitted.run, 0).module.method  # built, nothing loaded or replayed
        fresh.load_state(*state)
        _assert_same_state(fresh.state(), state, f"{fitted.name}: stage {stage}: load_state then state()")
        restored = fitted.restored(stage).method  # and after the replay of the finished tasks' hooks
        _assert_same_state(restored.state(), state, f"{fitted.name}: stage {stage}: restored, then state()")


def test_only_experts_and_routers_train(fitted):
    method = fitted.probe.module.method
    expected = [(t, p.name) for t in range(TASKS) for p in method.phases(t, TASKS)]
    assert [(t, name) for t, name, _ in fitted.probe.phases] == expected
    for task, phase, trainable in fitted.probe.phases:
        where = f"{fitted.name}: task {task} phase {phase}"
        assert trainable, f"{where}: nothing trains"
        others = [n for n in trainable if ".experts." not in n and ".routers." not in n]
        assert not others, f"{where}: trains parameters outside the experts and routers: {others[:5]}"
