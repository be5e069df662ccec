"""``mllm-cl fit``: LightningCLI over ContinualMLLM + TaskSequence, running a whole sequence.

    mllm-cl fit --config configs/experiments/X.yaml --config configs/methods/Y.yaml

The options are parsed, checked and built by ``mllm_cl.system.build`` (the strategy against
the method, the run directory, every class given by its path, every task's files). LightningCLI
then calls a method named after the subcommand on the CLI class, so ``ContinualCLI.fit`` owns
the run: the continual loop builds one fresh Trainer per phase from the configured trainer
options, with an explicit callback list (the configured callbacks, the same instances every time).

Several processes (``--trainer.strategy ddp --trainer.devices N``): the
processes are started before the zero-shot evaluation, by Lightning's own
launcher (it re-runs this command with ``LOCAL_RANK`` set), and the process
group is set up once; every later Trainer finds it. ``ddp`` here finds unused
parameters (a top-k router leaves some experts without gradient in a step).

Every Trainer option is checked before the zero-shot evaluation: a Trainer option Lightning
refuses is one message, as one phase Trainer is built (and the model's gradient clipping tried
on it) before the loop starts.

Logging: without ``--trainer.logger`` a run logs to CSV in RUN/logs; a logger given without
``save_dir`` writes into the run directory. The same logger instances serve every phase: one
logger run per ``mllm-cl fit``, the resolved config as its hyperparameters, and one run-wide
step (``mllm_cl.system.loop``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger

from mllm_cl.callbacks import ContinualCallback
from mllm_cl.data_modules import TaskSequence
from mllm_cl.errors import UserError
from mllm_cl.system.build import BuildCLI, RunFinished, build
from mllm_cl.system.loop import ContinualLoop
from mllm_cl.system.module import ContinualMLLM
from mllm_cl.system.progress import with_phase_progress
from mllm_cl.system.resident import phase_strategy

# Trainer options the loop sets itself for every phase.
_LOOP_OWNED = ("max_steps", "max_epochs", "callbacks", "logger", "enable_checkpointing", "default_root_dir",
               "limit_val_batches", "num_sanity_val_steps", "use_distributed_sampler")


class ContinualCLI(BuildCLI):
    """``mllm-cl fit``: the built model and task sequence, trained and evaluated task by task."""

    def fit(self, model: ContinualMLLM, datamodule: TaskSequence, **_) -> None:
        cfg = self.config["fit"]
        seed = int(cfg["seed_everything"])
        run_dir = self.run_dir  # checked in before_instantiate_classes
        trainer_cfg = self.config_init["fit"]["trainer"]
        base = {k: v for k, v in trainer_cfg.items() if k not in _LOOP_OWNED}
        callbacks = list(self.trainer.callbacks) + model.method.callbacks()  # a method's own statistics
        loggers = self.trainer.loggers
        if not loggers:  # CSV by default, in the run directory; --trainer.logger picks others (TensorBoard, ...)
            # A resumed run logs beside the first attempt's file (RUN/logs/resume-N/), which CSVLogger
            # would otherwise delete.
            logs = Path(run_dir, "logs")
            version = f"resume-{len(list(logs.glob('resume-*'))) + 1}" if (logs / "metrics.csv").exists() else ""
            loggers = [CSVLogger(save_dir=run_dir, name="logs", version=version)]

        wraps = []  # the phases fitted in this process: the first DDP wrap also broadcasts the frozen base

        configured_accumulation = int(base.get("accumulate_grad_batches") or 1)
        if model.budget.samples_per_step is not None and configured_accumulation != 1:
            raise UserError(f"model.samples_per_step ({model.budget.samples_per_step}) sets the accumulation of every "
                            f"phase; trainer.accumulate_grad_batches ({configured_accumulation}) would too: give one")

        def make_trainer(steps: int, accumulation: int | None = None, *, configured: bool = False,
                         extra_callbacks=()) -> L.Trainer:
            options = dict(base)
            if accumulation is not None:  # the phase's plan (mllm_cl.system.budget); else the configured one
                options["accumulate_grad_batches"] = accumulation
            if not configured:  # a fresh strategy per Trainer (Lightning binds one to one), keeping the model in place
                strategy = phase_strategy(first, unused_parameters=model.method.unused_parameters,
                                          wrapped_before=bool(wraps))
                options["strategy"] = options["strategy"] if strategy is None else strategy
                wraps.append(steps)
            phase_callbacks = (with_phase_progress(callbacks, options, trainer_cfg.get("callbacks"))
                               + list(extra_callbacks))
            trainer = L.Trainer(**options, max_steps=steps, max_epochs=-1, callbacks=phase_callbacks, logger=loggers,
                             enable_checkpointing=False, default_root_dir=run_dir, limit_val_batches=0,
                             num_sanity_val_steps=0, use_distributed_sampler=False)  # the data module shards
            # One Trainer per phase: say the device line once, not once per phase.
            logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
            return trainer

        config_text = self.config_text
        try:  # every Trainer option, checked before the zero-shot evaluation (a phase's Trainer takes the same)
            first = make_trainer(1, configured=True)  # starts the other processes (ddp), says which device is ours
            model.check_gradient_clipping(first)  # Lightning checks it at the first optimizer step only
        except (MisconfigurationException, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"trainer: {' '.join(str(e).split())}") from e

        def run() -> None:
            if first.world_size > 1:
                first.strategy.setup_environment()  # the process group, once for every later Trainer
            ContinualLoop(model, datamodule, make_trainer, run_dir, config_text=config_text,
                          experiment=cfg["experiment"], seed=seed,
                          callbacks=[c for c in callbacks if isinstance(c, ContinualCallback)],
                          eval_future_tasks=cfg["eval_future_tasks"], score_mode=cfg["score_mode"], loggers=loggers,
                          device=first.strategy.root_device, checkpoint_every_n_steps=cfg["checkpoint_every_n_steps"],
                          accumulation=configured_accumulation)()

        if first.world_size > 1:
            first.strategy.launcher.launch(run, trainer=first)
        else:
            run()


def main(argv: list[str] | None = None) -> int:
    try:
        build(sys.argv[2:] if argv is None else argv, ContinualCLI)
    except RunFinished as done:
        print(done)
    return 0
