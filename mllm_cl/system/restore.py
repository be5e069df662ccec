"""A run's model at one stage, rebuilt from its run directory alone.

``restore(RUN, stage)`` parses ``RUN/config.yaml`` as ``mllm-cl fit`` does
(``mllm_cl.system.build``), builds the backbone it names and the method, connects the task
sequence, and replays the method's state and structure up to checkpoint ``task_NN``
(``loop.rebuild``, the resume path), so the model routes exactly as it did when that stage
was evaluated. The report's routing diagnostic, ``mllm-cl predict`` and ``mllm-cl export``
use it; ``mllm-cl evaluate`` gives ``overrides`` (``mllm-cl fit`` options, e.g.
``--model.method.init_args.route_by task_id``) to rebuild the same trained weights under
another evaluation-time setting.

What stops it is a user error naming the file and what to do: a folder that is no run
directory, a run written by another results schema, a stage the run has not reached or
whose checkpoint is incomplete, a backbone directory that is no longer where config.yaml
says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mllm_cl.errors import UserError
from mllm_cl.methods.base import ORACLE_ROUTER
from mllm_cl.system.build import BuildCLI, build
from mllm_cl.system.loop import rebuild
from mllm_cl.system.run_dir import SCHEMA_VERSION, RunDir


@dataclass
class Restored:
    module: Any  # the ContinualMLLM, in eval mode
    datamodule: Any  # the TaskSequence, connected
    results: dict[str, Any]
    stage: int  # tasks trained (checkpoint task_NN; 0: the base)
    run_dir: Path | None = None
    config_text: str = ""  # the config it was built from, with the overrides, as mllm-cl fit writes it


class _Reading(BuildCLI):
    """Builds a run to read it, not to resume it: its directory is not checked (finished is fine)."""

    def _check_run_dir(self, cfg, method_name: str) -> None:
        self.config_text = self.dump_config(cfg)


def restore(run_dir: str | Path, stage: int | None = None, *, device: str | None = None,
            overrides: list[str] = ()) -> Restored:
    run = RunDir(run_dir)
    config = run.path / "config.yaml"
    if not run.path.is_dir():
        raise FileNotFoundError(f"{run.path} does not exist (give a run directory: what mllm-cl fit printed)")
    for f in (config, run.results_path):
        if not f.is_file():
            raise UserError(f"{f} is missing: {run.path} is not an mllm-cl run directory, or its run stopped before "
                            "the first evaluation (run mllm-cl fit on it again)")
    results = run.load_results()
    if results.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{run.results_path} has schema_version {results.get('schema_version')!r}; this mllm-cl "
                        f"reads {SCHEMA_VERSION}: use the mllm-cl version that wrote the run (its commit is in the "
                        "file's environment block) or run it again with this one")
    done = results["completed_tasks"]
    stage = done if stage is None else stage
    if not 0 <= stage <= done:
        have = f"stages 0..{done} (checkpoints task_01..task_{done:02d})" if done else "stage 0 (the base) only"
        raise UserError(f"{run.results_path}: stage {stage} is not available; the run finished {done} task(s): "
                        f"{have}. Give --stage in that range, or finish the run (rerun its mllm-cl fit)")
    if stage and not (run.checkpoint_dir(stage) / "structure.json").is_file():
        raise UserError(f"{run.checkpoint_dir(stage) / 'structure.json'} is missing: checkpoint task_{stage:02d} "
                        "is incomplete; give another --stage")
    _check_backbone(config)
    cli = build(["--config", str(config), *overrides], _Reading)
    module, dm = cli.model, cli.datamodule
    spec = module.model.data_spec()
    dm.connect(module.tokenizer, module.image_processor(), spec.pop("num_image_tokens"), **spec)
    module.sequence = dm
    rebuild(module, run, stage, unsaved_routers=(ORACLE_ROUTER,))  # a run evaluated again by its oracle
    if device is not None:
        module.to(device)
    module.eval()
    return Restored(module=module, datamodule=dm, results=results, stage=stage, run_dir=run.path,
                    config_text=cli.config_text)


def _check_backbone(config: Path) -> None:
    """A backbone given by path must still be there (checked before anything is built)."""
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    path = model.get("backbone_path")
    if path and not Path(path).is_dir():
        raise UserError(f"{config}: model.backbone_path {path} does not exist (moved or deleted?). Put the "
                        f"checkpoint back there, or edit model.backbone_path in {config} to where it is now "
                        "(the same weights: the adapters were trained on them)")
