"""A run built from ``mllm-cl fit``'s options: ``build(args, cli_class)``.

``build`` parses the options and configs with LightningCLI over ContinualMLLM + TaskSequence,
checks them, and builds the model, the task sequence and a configured Trainer; then LightningCLI
calls ``cli_class.fit(model, datamodule)``. ``BuildCLI.fit`` does nothing: the caller reads the
built objects off the returned CLI (``cli.model``, ``cli.datamodule``, ``cli.config_text``). The
commands differ only in their subclass: ``mllm-cl fit`` runs the continual loop in ``fit``
(``mllm_cl.fit.ContinualCLI``), ``mllm-cl plan`` prints the plan (``mllm_cl.plan``), a run
rebuilt from its directory reads the run directory without checking it
(``mllm_cl.system.restore``).

The strategy is checked against the method before anything is built
(``mllm_cl.system.strategies``), and so is the run directory: another config there is refused
(``ConfigMismatch``), a finished run of this config is left as it is (``RunFinished``). Every
task's files are read and checked before any Trainer is built (``TaskSequence.check_files``).
Help, refused options and parse errors: ``mllm_cl.fit_options``.

Every option is checked before anything runs: a class given by its path (a logger, a callback,
the method) that cannot be built is one message naming its key. Gradient clipping is
``model.grad_clip`` alone (the norm every phase clips to); ``trainer.gradient_clip_val`` and
``trainer.gradient_clip_algorithm`` are refused. A logger given without ``save_dir``
(``--trainer.logger CSVLogger``) writes into the run directory.
"""

from __future__ import annotations

import importlib
import re
import time
import warnings
from argparse import ArgumentError

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from mllm_cl import fit_options
from mllm_cl.console import quiet_third_party
from mllm_cl.data_modules import TaskSequence
from mllm_cl.errors import UserError
from mllm_cl.system.module import ContinualMLLM
from mllm_cl.system.run_dir import RunDir
from mllm_cl.system.strategies import check_strategy

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


class BuildCLI(LightningCLI):
    """``mllm-cl fit``'s parser and checks; ``fit`` keeps the built objects (a subclass runs them)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # fit only; Trainer.fit's ckpt_path and weights_only are no options here (fit_options.REFUSED)
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule", "ckpt_path", "weights_only"}}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        fit_options.order_help(self._subcommand_parsers["fit"] if add_subcommands else self.parser)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
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

    def dump_config(self, cfg) -> str:
        """The resolved config as ``config.yaml`` holds it: link targets and null values included (an option
        set to null over a non-null default must read back as null)."""
        return self._parser("fit").dump(cfg, skip_link_targets=False, skip_unset=False)

    def _check_run_dir(self, cfg, method_name: str) -> None:
        """The run directory, checked before the backbone is built: another config there is refused
        (``ConfigMismatch``), a finished run of this one is left as it is (``RunFinished``)."""
        self.run_dir = _run_dir(cfg, method_name)
        self.config_text = self.dump_config(cfg)
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
        t0 = time.time()
        n = self.datamodule.check_files()
        if rank_zero_only.rank == 0 and self.subcommand == "fit":
            skipped = f", {n['skipped']} skipped as bad" if n["skipped"] else ""
            print(f"mllm-cl: data: files of {n['tasks']} tasks checked ({n['train']} training and {n['test']} test "
                  f"records{skipped}) in {time.time() - t0:.1f} s", flush=True)
        return super().instantiate_trainer(**kwargs)

    def fit(self, model: ContinualMLLM, datamodule: TaskSequence, **_) -> None:
        """Built: ``model`` and ``datamodule`` are ``self.model`` and ``self.datamodule``."""


def build(args: list[str], cli_class: type[BuildCLI] = BuildCLI) -> BuildCLI:
    """``mllm-cl fit``'s options ``args`` (``--config`` files and ``--key value`` overrides, in order)
    parsed, checked and built by ``cli_class``, which has run its ``fit`` when this returns."""
    quiet_third_party()  # Lightning's and transformers' lines that are not the user's business
    # The dispatcher passes fit's own arguments explicitly; Lightning warns whenever sys.argv is also set.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return cli_class(
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
    return ('"trainer.logger"' in message
            and re.search(r"Problem with given class_path '[^']+':\s+the following arguments are required: save_dir\b",
                          message) is not None)


def _default_save_dirs(logger, run_dir: str) -> None:
    """Each configured logger's ``save_dir`` left out or null becomes ``run_dir``."""
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
