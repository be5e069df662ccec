"""``mllm-cl fit``: LightningCLI over ContinualMLLM + TaskSequence, running a whole sequence.

    mllm-cl fit --config configs/experiments/X.yaml --config configs/methods/Y.yaml

LightningCLI calls a method named after the subcommand on the CLI class
first, so ``ContinualCLI.fit`` owns the run: the continual loop builds one
fresh Trainer per phase from the configured trainer options, with an explicit
callback list (the configured callbacks, the same instances every time).

Several processes (``--trainer.strategy ddp --trainer.devices N``): the
processes are started before the zero-shot evaluation, by Lightning's own
launcher (it re-runs this command with ``LOCAL_RANK`` set), and the process
group is set up once; every later Trainer finds it. ``ddp`` here finds unused
parameters (a top-k router leaves some experts without gradient in a step).
The strategy is checked against the method before anything is built
(``mllm_cl.system.strategies``), and so is the run directory: another config
there is refused, a finished run is left as it is. Every task's files are
read and checked before any Trainer is built (``TaskSequence.check_files``).
Help, refused options and parse errors: ``mllm_cl.fit_options``.

Every option is checked before the zero-shot evaluation: a class given by its
path (a logger, a callback, the method) that cannot be built is one message
naming its key, and so is a Trainer option Lightning refuses: one phase Trainer
is built (and the model's gradient clipping tried on it) before the loop starts.
Gradient clipping is ``model.grad_clip`` alone (the norm every phase clips to);
``trainer.gradient_clip_val`` and ``trainer.gradient_clip_algorithm`` are refused.

Logging: a logger given without ``save_dir`` (``--trainer.logger CSVLogger``)
writes into the run directory; without ``--trainer.logger`` a run logs to CSV in
RUN/logs. The same logger instances serve every phase: one logger run per
``mllm-cl fit``, the resolved config as its hyperparameters, and one run-wide
step (``mllm_cl.system.loop``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mllm_cl.callbacks import ContinualCallback
from mllm_cl.data_modules import TaskSequence
from mllm_cl import fit_options
from mllm_cl.errors import UserError
from mllm_cl.system.module import ContinualMLLM

# Trainer options the loop sets itself for every phase.
_LOOP_OWNED = ("max_steps", "max_epochs", "callbacks", "logger", "enable_checkpointing", "default_root_dir",
               "limit_val_batches", "num_sanity_val_steps", "use_distributed_sampler")


#: Trainer options a model option sets instead, and which.
_MODEL_OWNED = {
    "gradient_clip_val": "gradient clipping is set by model.grad_clip alone (the gradient norm every phase clips "
                         "to; 0: off): remove it and give --model.grad_clip {value}",
    "gradient_clip_algorithm": "gradient clipping is set by model.grad_clip alone, which clips the gradient norm "
                               "(clipping by value is not offered): remove it",
}

#: A logger's ``save_dir`` until the run directory is known (it is set before anything is built).
_RUN_DIR_PLACEHOLDER = "<the run directory>"


class RunFinished(Exception):
    """The run directory holds a finished run of this config: there is nothing to do."""


class ContinualCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # fit only; Trainer.fit's ckpt_path and weights_only are no options here (fit_options.REFUSED)
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule", "ckpt_path", "weights_only"}}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        fit_options.order_help(self._subcommand_parsers["fit"] if add_subcommands else self.parser)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        from argparse import ArgumentError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:  # one message, no usage dump (parsers are built with exit_on_error=False)
            message = e.message
            if _needs_save_dir(message) and isinstance(args, list):
                # A logger without save_dir writes into the run directory, known once the rest is parsed.
                try:
                    return super().parse_arguments(parser, [*args, "--trainer.logger.save_dir", _RUN_DIR_PLACEHOLDER])
                except ArgumentError as again:
                    message = message if "save_dir" in again.message else again.message
            fit_parser = getattr(self, "_subcommand_parsers", {}).get("fit", parser)
            raise fit_options.explain(message, fit_parser, list(args or [])) from e

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str, default="experiment",
                            help="experiment name: the run directory defaults to runs/<experiment>-<method>-s<seed>")
        parser.add_argument("--eval_future_tasks", type=bool, default=False,
                            help="also evaluate task t+1 after task t (the entries FWT needs)")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=0,
                            help="also checkpoint within a task every N optimizer steps of a phase (the last one "
                                 "kept in RUN/checkpoints/in_task/): a rerun after a crash resumes there, and ends "
                                 "with the matrix of an uninterrupted run. 0: only after each task")
        parser.add_argument("--score_mode", type=str, default="official",
                            help="scorer mode: official (the benchmark's script, quirks included) or clean")
        parser.link_arguments("seed_everything", "data.seed")
        # The model builds its frozen base in the precision's compute dtype (model.backbone_dtype: auto).
        parser.link_arguments("trainer.precision", "model.precision")
        # ... and loads it straight onto the device the trainer will use (model.load_device: auto).
        parser.link_arguments("trainer.accelerator", "model.accelerator")

    def before_instantiate_classes(self) -> None:
        """Refuse a strategy the method cannot run under before anything is built."""
        import importlib

        from jsonargparse import Namespace

        from mllm_cl.system.strategies import check_strategy

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        module, _, name = str(cfg["model"]["method"]["class_path"]).rpartition(".")
        method = getattr(importlib.import_module(module), name)
        strategy = cfg["trainer"]["strategy"]
        if isinstance(strategy, Namespace):
            strategy = strategy.as_dict()
        try:
            check_strategy(strategy, method)
        except ValueError as e:
            raise UserError(str(e)) from e
        defaults = self._parser(self.subcommand).get_defaults()["trainer"]
        fit_options.refuse_loop_owned(cfg["trainer"], defaults)
        _refuse_model_owned(cfg["trainer"], defaults)
        _default_save_dirs(cfg["trainer"].get("logger"), _run_dir(cfg, method.name))
        if self.subcommand == "fit":
            self._check_run_dir(cfg, method.name)

    def _check_run_dir(self, cfg, method_name: str) -> None:
        """The run directory, checked before the backbone is built: another config there is refused
        (``ConfigMismatch``), a finished run of this one is left as it is (``RunFinished``)."""
        from mllm_cl.system.run_dir import RunDir

        self.run_dir = _run_dir(cfg, method_name)
        self.config_text = self._parser("fit").dump(cfg, skip_link_targets=False, skip_none=False)
        run = RunDir(self.run_dir)
        if run.check_config(self.config_text) and (results := run.finished()) is not None:
            raise RunFinished(f"mllm-cl: {self.run_dir} holds a finished run of this config "
                              f"({results['completed_tasks']} of {len(results['order'])} tasks); nothing to do. "
                              f"Results: {run.results_path} (`mllm-cl report {self.run_dir}` for the tables); "
                              "another --trainer.default_root_dir starts a new run.")

    def instantiate_classes(self) -> None:
        """The configured classes; one that cannot be built (a logger whose package is missing, a callback
        refusing its arguments) is a UserError naming its key and class."""
        try:
            super().instantiate_classes()
        except Exception as e:
            problem = _class_path_problem(e, self.config[self.subcommand] if self.subcommand else self.config,
                                          own=(self._model_class, self._datamodule_class))
            if problem is None:
                raise
            raise UserError(problem) from e

    def instantiate_trainer(self, **kwargs):
        """Every task's files are read and checked first: a malformed file of the last task stops
        the run here, in seconds, before any Trainer exists and before the first task trains."""
        import time

        from lightning.pytorch.utilities import rank_zero_only

        t0 = time.time()
        n = self.datamodule.check_files()
        if rank_zero_only.rank == 0 and self.subcommand == "fit":
            skipped = f", {n['skipped']} skipped as bad" if n["skipped"] else ""
            print(f"mllm-cl: data: files of {n['tasks']} tasks checked ({n['train']} training and {n['test']} test "
                  f"records{skipped}) in {time.time() - t0:.1f} s", flush=True)
        return super().instantiate_trainer(**kwargs)

    def fit(self, model: ContinualMLLM, datamodule: TaskSequence, **_) -> None:
        import logging

        import lightning as L

        from mllm_cl.system.loop import ContinualLoop
        from mllm_cl.system.progress import with_phase_progress
        from mllm_cl.system.resident import phase_strategy

        cfg = self.config["fit"]
        seed = int(cfg["seed_everything"])
        run_dir = self.run_dir  # checked in before_instantiate_classes
        trainer_cfg = self.config_init["fit"]["trainer"]
        base = {k: v for k, v in trainer_cfg.items() if k not in _LOOP_OWNED}
        callbacks = list(self.trainer.callbacks) + model.method.callbacks()  # a method's own statistics
        loggers = self.trainer.loggers
        if not loggers:  # CSV by default, in the run directory; --trainer.logger picks others (TensorBoard, ...)
            from lightning.pytorch.loggers import CSVLogger

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
            phase_callbacks = with_phase_progress(callbacks, options, trainer_cfg.get("callbacks")) + list(extra_callbacks)
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


def _run_dir(cfg, method_name: str) -> str:
    """``trainer.default_root_dir``, or ``runs/<experiment>-<method>-s<seed>``."""
    seed = int(cfg["seed_everything"])
    return cfg["trainer"].get("default_root_dir") or f"runs/{cfg['experiment']}-{method_name}-s{seed}"


def _refuse_model_owned(trainer_cfg, defaults) -> None:
    """A UserError naming every Trainer option that a model option sets instead, when it is set."""
    given = [k for k in _MODEL_OWNED if trainer_cfg.get(k) != defaults.get(k)]
    if given:
        raise UserError("\n".join(f"trainer.{k} ({trainer_cfg[k]!r}): {_MODEL_OWNED[k].format(value=trainer_cfg[k])}"
                                  for k in given))


def _needs_save_dir(message: str) -> bool:
    """Whether a parse error is only a ``trainer.logger`` class given without its required ``save_dir``."""
    import re

    return ('"trainer.logger"' in message
            and re.search(r"Problem with given class_path '[^']+':\s+the following arguments are required: save_dir\b",
                          message) is not None)


def _default_save_dirs(logger, run_dir: str) -> None:
    """Each configured logger's ``save_dir`` left out or null becomes ``run_dir``."""
    from jsonargparse import Namespace

    for spec in logger if isinstance(logger, list) else [logger]:
        init = spec.get("init_args") if isinstance(spec, (Namespace, dict)) else None
        if isinstance(init, (Namespace, dict)) and "save_dir" in init \
                and init["save_dir"] in (None, _RUN_DIR_PLACEHOLDER):
            init["save_dir"] = run_dir


def _class_path_problem(error: BaseException, cfg, own: tuple[type, ...]) -> str | None:
    """``KEY: CLASS could not be built (TYPE): why`` when ``error`` came from the ``__init__`` of a class
    jsonargparse built from the config (a logger, a callback, the method), or None (another error, or
    one of the ``own`` classes: the model and the data module say what is wrong themselves)."""
    chain, e = [], error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    built = [(x, cls) for x in chain if (cls := _class_being_built(x)) is not None]
    if not built:
        return None
    root, cls = built[-1]  # the innermost: what the class's __init__ raised
    if cls in own:
        return None
    keys = _keys_of(cfg, cls)
    key, class_path = keys[0] if keys else (None, f"{cls.__module__}.{cls.__qualname__}")
    why = " ".join(str(root).split()) or "(no message)"
    return f"{key + ': ' if key else ''}{class_path} could not be built ({type(root).__name__}): {why}"


def _class_being_built(error: BaseException) -> type | None:
    """The class jsonargparse was building where ``error`` was raised (the innermost one), or None."""
    cls, tb = None, error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if "jsonargparse" in frame.f_code.co_filename and isinstance(frame.f_locals.get("class_type"), type):
            cls = frame.f_locals["class_type"]
        tb = tb.tb_next
    return cls


def _keys_of(value, cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(config key, class path) of each ``class_path`` in the config that names ``cls``
    (``trainer.callbacks[1]``, ``lightning.pytorch.callbacks.EarlyStopping``)."""
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        value = value.__dict__
    if isinstance(value, dict):
        path = value.get("class_path")
        here = [(prefix, path)] if isinstance(path, str) and prefix and path.rpartition(".")[2] == cls.__name__ else []
        return here + [k for name, v in value.items()
                       for k in _keys_of(v, cls, f"{prefix}.{name}" if prefix else str(name))]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _keys_of(v, cls, f"{prefix}[{i}]")]
    return []


def run_cli(args: list[str], cli_class: type[ContinualCLI] = None) -> ContinualCLI:
    """``fit`` with ``args`` through ``cli_class`` (a subclass may do something else with the built objects)."""
    import warnings

    from mllm_cl.console import quiet_third_party

    quiet_third_party()  # Lightning's and transformers' lines that are not the user's business
    # The dispatcher passes fit's own arguments explicitly; Lightning warns whenever sys.argv is also set.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return (cli_class or ContinualCLI)(
        ContinualMLLM,
        TaskSequence,
        args=["fit", *args],
        save_config_callback=None,  # the loop writes RUN/config.yaml itself, and checks it on resume
        trainer_defaults={"enable_checkpointing": False, "logger": False},
        # Parse errors are raised (and explained in one message by parse_arguments), not printed after the
        # usage of every option; jsonargparse gives a subcommand its parent's formatter.
        parser_kwargs={"prog": "mllm-cl", "exit_on_error": False, "formatter_class": fit_options.HelpFormatter,
                       "fit": {"default_config_files": [], "exit_on_error": False, "allow_abbrev": False,
                               "usage": fit_options.USAGE, "description": fit_options.DESCRIPTION}},
        seed_everything_default=0,
        auto_configure_optimizers=False,  # ContinualMLLM gives the optimizer only trainable parameters
    )


def main(argv: list[str] | None = None) -> int:
    try:
        run_cli(sys.argv[2:] if argv is None else argv)
    except RunFinished as done:
        print(done)
    return 0
