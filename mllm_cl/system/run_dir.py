"""The run directory: resolved config, results.json, adapters-only checkpoints, predictions.

    RUN/config.yaml                 the resolved config; a resume with another config is refused
    RUN/results.json                see ``new_results`` for the schema (schema_version 1)
    RUN/checkpoints/task_NN/        adapters.safetensors + structure.json, after the N-th task
    RUN/checkpoints/in_task/        the last checkpoint within the task in progress (the same files, the
                                    optimizer's state in trainer.pt); gone once that task is finished
    RUN/predictions/stage_NN/TASK.jsonl   stage_00 is zero-shot; stage_NN after the N-th task

Writes are atomic (temporary file + rename), so a crash never leaves a
half-written results.json or checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from mllm_cl.errors import UserError
from mllm_cl.experts import expert_layers

SCHEMA_VERSION = 1


class ConfigMismatch(UserError, RuntimeError):
    """A run directory holds another config than the one given; the message lists the keys that differ."""


_ABSENT = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys (``model.lr``, ``data.tasks[1].train``) -> values; lists of scalars stay whole."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def config_differences(saved: str, now: str) -> list[str]:
    """``KEY: SAVED -> NOW`` for every full key whose value differs between two YAML configs. A key
    that is absent equals one that is null (a config written without its null values)."""
    a, b = _flatten(yaml.safe_load(saved) or {}), _flatten(yaml.safe_load(now) or {})
    show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v, default=str)  # noqa: E731
    return [f"{k}: {show(a.get(k, _ABSENT))} -> {show(b.get(k, _ABSENT))}"
            for k in [*a, *(k for k in b if k not in a)] if a.get(k) != b.get(k)]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert-layer tensor but the frozen base weights: experts, routers, statistics buffers."""
    state = {}
    for name, layer in expert_layers(model).items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base_layer."):
                state[f"{name}.{key}"] = value.detach().contiguous().cpu()
    return state


def structure(model: nn.Module) -> dict[str, Any]:
    """Experts (with ranks) and routers (with the experts they cover) per layer."""
    return {
        name: {
            "experts": {e: layer.experts[e].rank for e in layer.expert_names},
            "routers": {r: {"class": type(router).__name__, "experts": list(router.expert_names)}
                        for r, router in layer.routers.items()},
        }
        for name, layer in expert_layers(model).items()
    }


def parameter_counts(params: list[tuple[str, nn.Parameter]], statistics: set[str] = frozenset(),
                     method_state: tuple[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Parameter counts by kind (expert, router, other); tensors named in ``statistics`` (buffers
    a method keeps, such as SAME's covariances) are listed apart and left out of the total.
    ``method_state``: (kind, tensors) the method stores outside the expert layers to route
    (a task locator, prototypes, anchors): counted under that kind, in the total."""
    kinds: dict[str, int] = {}
    for name, p in params:
        kind = "statistics" if name in statistics else "expert" if ".experts." in name \
            else "router" if ".routers." in name else "other"
        kinds[kind] = kinds.get(kind, 0) + p.numel()
    if method_state is not None and method_state[1]:
        kinds[method_state[0]] = kinds.get(method_state[0], 0) + sum(t.numel() for t in method_state[1].values())
    return {"total": sum(n for k, n in kinds.items() if k != "statistics"), "by_kind": kinds}


def new_results(*, method: str, experiment: str, seed: int, tasks: list[dict], one_row: bool) -> dict[str, Any]:
    """results.json, schema_version 1:

    schema_version, method, experiment, seed, order (task names in training order),
    tasks [{name, scorer, mode}], one_row (only the final row is evaluated),
    zero_shot [T scores] , matrix [T][T] with null where not evaluated,
    metrics {MFT, MFN, MAA, BWT, forgetting, FWT} (null where undefined),
    locator_accuracy (per task, for methods with a task locator, else null),
    params {trainable_per_task: [{total, by_kind}], stored_per_task: [{total, by_kind}]},
    timings {zero_shot_eval_s, tasks: [{phases: {name: seconds}, eval_s}]},
    bad_samples {train: {task: {skipped, reasons}}, eval: {stage_NN: {task: {scored, skipped, reasons}}}}
    (input left out under ``on_bad_sample: skip``: training samples per task, counted each time
    a batch met one; test rows per task and stage, each score being over the ``scored`` rows),
    general {tasks: [{name, scorers}], scores: {stage_NN: {task: {scorer: score}}}, retention}
    (general tasks, never trained: ``data.general``),
    completed_tasks (how many tasks are finished: a resume starts after them),
    global_step (optimizer steps of the finished tasks: the run-wide step a resumed run's logs go on from),
    environment (versions, CPU, threads, device, git commit: ``system.environment``; the loop adds
    it, and ``earlier_environments`` when a resumed run's differs).
    """
    T = len(tasks)
    return {
        "schema_version": SCHEMA_VERSION,
        "method": method,
        "experiment": experiment,
        "seed": seed,
        "order": [t["name"] for t in tasks],
        "tasks": tasks,
        "one_row": one_row,
        "zero_shot": None,
        "matrix": [[None] * T for _ in range(T)],
        "metrics": None,
        "locator_accuracy": None,
        "params": {"trainable_per_task": [], "stored_per_task": []},
        "timings": {"zero_shot_eval_s": None, "tasks": []},
        "bad_samples": {"train": {}, "eval": {}},
        "completed_tasks": 0,
    }


class RunDir:
    """Args:
        path: the run directory.
        writer: this process writes (under several processes only rank 0 does; the others
            read what it wrote and skip every write).
    """

    def __init__(self, path: str | Path, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    def checkpoint_dir(self, task_number: int) -> Path:
        return self.path / "checkpoints" / f"task_{task_number:02d}"

    @property
    def in_task_dir(self) -> Path:
        return self.path / "checkpoints" / "in_task"

    def predictions_path(self, stage: int, task: str) -> Path:
        return self.path / "predictions" / f"stage_{stage:02d}" / f"{task}.jsonl"

    def check_config(self, config_text: str) -> bool:
        """True when the directory holds a run of this config, False when it holds none; raises
        ``ConfigMismatch`` listing the keys that differ when it holds a run of another config.
        Configs are compared by value (comments and layout do not count)."""
        path = self.path / "config.yaml"
        if not path.exists():
            return False
        old = path.read_text()
        if old != config_text:
            diff = config_differences(old, config_text)
            if diff:
                more = [f"... and {len(diff) - 40} more"] if len(diff) > 40 else []
                raise ConfigMismatch(
                    f"{path} holds a different config; refusing to resume a run with another config. "
                    "Choose another --trainer.default_root_dir or delete the run. Differences (saved -> now):\n"
                    + "\n".join(f"  {d}" for d in diff[:40] + more))
        return True

    def claim(self, config_text: str) -> bool:
        """Write config.yaml, or check it against an existing one. True when resuming."""
        if not self.writer:
            raise RuntimeError("only the writing process claims the run directory")
        if self.check_config(config_text):
            return True
        _atomic_write(self.path / "config.yaml", config_text.encode())
        return False

    def finished(self) -> dict[str, Any] | None:
        """The results of a run that finished every task (its final metrics written), else None."""
        results = self.load_results()
        if results and results["metrics"] is not None and results["completed_tasks"] == len(results["order"]):
            return results
        return None

    def load_results(self) -> dict[str, Any] | None:
        if not self.results_path.exists():
            return None
        return json.loads(self.results_path.read_text())

    def save_results(self, results: dict[str, Any]) -> None:
        if not self.writer:
            return
        _atomic_write(self.results_path, (json.dumps(results, indent=2) + "\n").encode())

    def save_checkpoint(self, task_number: int, model: nn.Module, extra: dict[str, Any],
                        method_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Adapters, the method's own tensors (``method.safetensors``, when it has any) and
        ``structure.json`` (written last: a checkpoint without it is incomplete)."""
        if self.writer:
            write_checkpoint(self.checkpoint_dir(task_number), model, extra, method_tensors)

    def save_in_task(self, model: nn.Module, extra: dict[str, Any], method_tensors: dict[str, torch.Tensor],
                     trainer_state: dict[str, Any]) -> None:
        """The checkpoint within a task (``in_task/``), replacing the last one: written whole into
        ``in_task.new/`` first, so a crash at any point leaves one complete checkpoint."""
        if not self.writer:
            return
        new = self.in_task_dir.with_name("in_task.new")
        shutil.rmtree(new, ignore_errors=True)
        torch_save_atomic(new / "trainer.pt", trainer_state)
        write_checkpoint(new, model, extra, method_tensors)
        shutil.rmtree(self.in_task_dir, ignore_errors=True)
        os.replace(new, self.in_task_dir)

    def in_task(self) -> Path | None:
        """The folder of the last complete checkpoint within a task, if any."""
        for folder in (self.in_task_dir, self.in_task_dir.with_name("in_task.new")):
            if (folder / "structure.json").exists():
                return folder
        return None

    def drop_in_task(self) -> None:
        """Once the task it was taken in is finished (its task checkpoint written)."""
        if self.writer:
            for folder in (self.in_task_dir, self.in_task_dir.with_name("in_task.new")):
                shutil.rmtree(folder, ignore_errors=True)

    def method_state(self, task_number: int | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The method's saved (facts, tensors) of a checkpoint (empty for methods without): of task
        ``task_number``'s, or of the checkpoint folder given."""
        folder = task_number if isinstance(task_number, Path) else self.checkpoint_dir(task_number)
        saved = json.loads((folder / "structure.json").read_text())
        tensors = load_file(folder / "method.safetensors") if (folder / "method.safetensors").exists() else {}
        return saved.get("method_state", {}), tensors

    def load_checkpoint(self, task_number: int | Path, model: nn.Module, *, unsaved_routers: tuple[str, ...] = ()
                        ) -> dict[str, Any]:
        """Load adapter weights into a model whose structure was rebuilt; check they match.
        ``unsaved_routers``: parameter-free routers the model may hold that the checkpoint need not
        (the oracle's ``task_id`` router, added when a run is evaluated again with ``route_by: task_id``).
        ``task_number``: a task's checkpoint, or a checkpoint folder."""
        folder = task_number if isinstance(task_number, Path) else self.checkpoint_dir(task_number)
        saved = json.loads((folder / "structure.json").read_text())
        now = structure(model)
        for name, layer in now.items():
            kept = saved["layers"].get(name, {}).get("routers", {})
            layer["routers"] = {r: v for r, v in layer["routers"].items() if r in kept or r not in unsaved_routers}
        if saved["layers"] != now:
            raise RuntimeError(f"{folder}: the rebuilt expert structure differs from the saved one; "
                               "the method's task hooks are not deterministic")
        state = load_file(folder / "adapters.safetensors")
        expected = adapter_state(model)
        if set(state) != set(expected):
            missing, unexpected = set(expected) - set(state), set(state) - set(expected)
            raise RuntimeError(f"{folder}: adapter keys differ (missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]})")
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for key, value in state.items():
                target = params.get(key, buffers.get(key))
                target.copy_(value.to(target.dtype))
        return saved


def torch_save_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_checkpoint(folder: Path, model: nn.Module, extra: dict[str, Any],
                     method_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """``adapters.safetensors``, ``method.safetensors`` (when there are method tensors) and
    ``structure.json``, last, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "adapters.safetensors.tmp"
    save_file(adapter_state(model), tmp)
    os.replace(tmp, folder / "adapters.safetensors")
    if method_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in method_tensors.items()}, tmp)
        os.replace(tmp, folder / "method.safetensors")
    text = json.dumps({"layers": structure(model), **extra}, indent=2) + "\n"
    _atomic_write(folder / "structure.json", text.encode())
