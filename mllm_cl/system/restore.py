"""A run's model at one stage, rebuilt from its run directory alone.

``restore(RUN, stage)`` parses ``RUN/config.yaml`` as ``mllm-cl fit`` does, builds the
backbone it names and the method, connects the task sequence, and replays the method's
state and structure up to checkpoint ``task_NN`` (``loop.rebuild``, the resume path), so
the model routes exactly as it did when that stage was evaluated. The report's routing
diagnostic uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_cl.system.loop import rebuild
from mllm_cl.system.run_dir import RunDir


@dataclass
class Restored:
    module: Any  # the ContinualMLLM, in eval mode
    datamodule: Any  # the TaskSequence, connected
    results: dict[str, Any]
    stage: int  # tasks trained (checkpoint task_NN; 0: the base)


def restore(run_dir: str | Path, stage: int | None = None, *, device: str | None = None) -> Restored:
    from mllm_cl.fit import ContinualCLI, run_cli

    run = RunDir(run_dir)
    config, results = run.path / "config.yaml", run.load_results()
    if not config.is_file() or results is None:
        raise FileNotFoundError(f"{run.path}: no config.yaml or results.json; not an mllm-cl run directory")
    done = results["completed_tasks"]
    stage = done if stage is None else stage
    if not 0 <= stage <= done:
        raise ValueError(f"{run.path}: stage {stage} is not available; the run finished {done} task(s) "
                         f"(checkpoints task_01..task_{done:02d})")

    class _Build(ContinualCLI):
        def _check_run_dir(self, cfg, method_name: str) -> None:  # reading a run: finished or not
            pass

        def fit(self, model, datamodule, **_):  # build only: no loop
            self.built = (model, datamodule)

    module, dm = run_cli(["--config", str(config)], _Build).built
    spec = module.model.data_spec()
    dm.connect(module.tokenizer, module.image_processor(), spec.pop("num_image_tokens"), **spec)
    module.sequence = dm
    rebuild(module, run, stage)
    if device is not None:
        module.to(device)
    module.eval()
    return Restored(module=module, datamodule=dm, results=results, stage=stage)
