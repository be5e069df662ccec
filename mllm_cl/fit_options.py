"""What ``mllm-cl fit`` accepts, said plainly: its help, the options it refuses, its parse errors.

- ``--help`` starts with what fit does and a one-line usage, then the run's own
  options, the model (backbone, method, budget) and the data (the task
  sequence); Lightning's Trainer flags come last.
- Options the loop would silently ignore are refused with the reason:
  ``Trainer.fit``'s ``ckpt_path`` and ``weights_only`` (a run resumes from its
  own task checkpoints) and the Trainer options the loop sets for every phase;
  the help says so beside each of those and names what to set instead.
- A parse error becomes one ``UserError`` without the usage dump: a YAML
  syntax error names the file and line, an unknown key names the config file
  it is in and the nearest valid key (found the same way for a YAML key and a
  command-line one).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import DefaultHelpFormatter

from mllm_cl.errors import UserError

QUOTE = "'"
USAGE = "%(prog)s --config EXPERIMENT.yaml [--config METHOD.yaml] [--KEY VALUE ...]"

DESCRIPTION = """\
Run a continual task sequence into a run directory: the zero-shot row, then for
every task its phases (a fresh Lightning Trainer.fit each), an evaluation of
every task seen so far (one row of the accuracy matrix) and an adapters-only
checkpoint. The run directory (--trainer.default_root_dir, by default
runs/<experiment>-<method>-s<seed>) receives config.yaml, results.json,
checkpoints/, predictions/ and logs/. Rerunning the same command resumes after
the last finished task; a finished run is left as it is.

  mllm-cl fit --config configs/experiments/synth.yaml --config configs/methods/routing.yaml

An experiment config (model backbone and budget, data, trainer) and a method
config (model.method) are layered, later files win; every key can be set on
the command line too (--model.lr 0.001, --data.on_bad_sample skip). Below: the
run's own options, the model, the data, then Lightning's Trainer flags."""

#: Trainer.fit's options that mean nothing here, and why.
REFUSED = {
    "ckpt_path": "a run resumes from its own task checkpoints (RUN/checkpoints/task_NN): rerun the same command",
    "weights_only": "a run resumes from its own task checkpoints (RUN/checkpoints/task_NN), which hold tensors only",
}

#: Trainer options the loop sets for every phase, and what to set instead.
LOOP_OWNED = {
    "max_steps": "each phase's steps come from --model.steps_per_task or --model.epochs_per_task (and "
                 "--model.max_phase_steps)",
    "max_epochs": "give --model.epochs_per_task (with --model.steps_per_task null); each phase runs for the steps "
                  "its budget gives",
    "enable_checkpointing": "the loop saves adapters-only checkpoints per task in RUN/checkpoints/",
    "limit_val_batches": "there is no validation loop: every stage evaluates the test sets",
    "num_sanity_val_steps": "there is no validation loop: every stage evaluates the test sets",
    "use_distributed_sampler": "the data module gives each process its share itself (a DistributedSampler "
                               "seeded by the task)",
}

#: Help group titles by option prefix (the model's and the data's would be their docstrings' first line).
TITLES = {
    "model.": "Model (model.*): the backbone, the method (model.method) and the training budget",
    "data.": "Data (data.*): the task sequence, its files and batches",
    "trainer.": "Lightning Trainer (trainer.*), given to every phase's Trainer",
}
TRAINER_NOTE = textwrap.fill(f"The loop sets {', '.join(LOOP_OWNED)} itself (setting them is refused); without "
                             "--trainer.logger a run logs to CSV in RUN/logs; a logger without save_dir logs into "
                             "the run directory.", width=78)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's formatter (types and defaults), with the description's lines kept."""


def order_help(parser: argparse.ArgumentParser) -> None:
    """The run's own options, model and data first; Lightning's Trainer group last; empty groups gone;
    each loop-owned Trainer option's help says that the loop sets it and what to give instead."""
    for action in parser._actions:
        key = action.dest.removeprefix("trainer.")
        if action.dest.startswith("trainer.") and key in LOOP_OWNED:
            action.help = f"Set by the loop for every phase (refused if given): {LOOP_OWNED[key]}."
    groups = [g for g in parser._action_groups if g._group_actions]
    for g in groups:
        prefix = next((p for p in TITLES if all(a.dest.startswith(p) or a.dest == p[:-1] for a in g._group_actions)),
                      None)
        if prefix is not None and g.title != "Linked arguments":
            g.title = TITLES[prefix]
    trainer = [g for g in groups if g.title == TITLES["trainer."]]
    for g in trainer:
        g.description = TRAINER_NOTE
    parser._action_groups[:] = [g for g in groups if g not in trainer] + trainer


def refuse_loop_owned(trainer_cfg: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A UserError naming every loop-owned Trainer option set to something other than its default."""
    given = [k for k in LOOP_OWNED if k in trainer_cfg and trainer_cfg[k] != defaults.get(k)]
    if given:
        raise UserError("mllm-cl fit sets these Trainer options itself; remove them:\n"
                        + "\n".join(f"  trainer.{k} ({trainer_cfg[k]!r}): {LOOP_OWNED[k]}" for k in given))


# ----------------------------------------------------------------------------- parse errors

def config_files(args: list[str]) -> list[str]:
    """The ``--config`` / ``-c`` files of a command line, in order."""
    files = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def _keys(value: Any, prefix: str = "") -> list[str]:
    if not isinstance(value, dict):
        return [prefix]
    return [k for key, v in value.items() for k in _keys(v, f"{prefix}.{key}" if prefix else str(key))]


def _plain(key: str) -> str:
    return key.replace(".init_args.", ".").removeprefix("fit.")


def file_with(key: str, files: list[str], args: list[str] = ()) -> str | None:
    """The last of ``files`` that sets ``key`` (``init_args`` levels ignored), or None; None as well
    when the command line ``args`` set it (it wins over every file)."""
    if any(_plain(a[2:].split("=", 1)[0]) == _plain(key) for a in args if a.startswith("--")):
        return None
    for path in reversed(files):
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if _plain(key) in {_plain(k) for k in _keys(data)}:
            return path
    return None


def _initials(name: str) -> str:
    """``lr`` for ``learning_rate``; "" for a one-word name."""
    words = [w for w in name.split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else ""


def _abbreviates(a: str, b: str) -> bool:
    """Whether one of two key names is the other's initials (``lr``, ``learning_rate``)."""
    return a != b and (a == _initials(b) or b == _initials(a))


def nearest(word: str, candidates: list[str]) -> str | None:
    """The closest candidate to a key, the same for a YAML key and a command-line one: the key with dashes
    as underscores; a key with the same dotted prefix whose name is the other's initials (``learning_rate``
    -> ``lr``); the closest spelling, first among the keys with the same prefix, then among all; the same
    name under another prefix (``lr`` -> ``model.lr``)."""
    word = word.replace("-", "_")
    if word in candidates:
        return word
    prefix, _, name = word.rpartition(".")
    same = [c for c in candidates if c.rpartition(".")[0] == prefix]
    short = [c for c in same if _abbreviates(name, c.rpartition(".")[2])]
    if short:
        return short[0]
    for pool in (same, candidates):
        match = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    moved = [c for c in candidates if c.rpartition(".")[2] == name]
    return moved[0] if moved else None


def option_keys(parser: argparse.ArgumentParser) -> list[str]:
    return [s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def init_params(class_path: str) -> list[str]:
    """The keyword arguments a class accepts (following ``**kwargs`` to its bases, as jsonargparse does)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        if klass is object:
            break
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _unknown(key: str, candidates: list[str], files: list[str], option: bool, args: list[str]) -> UserError:
    dash = "--" if option else ""
    if key in REFUSED:
        return UserError(f"mllm-cl fit does not take {dash}{key}: {REFUSED[key]}")
    where = file_with(key, files, args)
    guess = nearest(key, candidates)
    hint = f"; did you mean `{dash}{guess}`?" if guess else ""
    place = f"{where}: unknown key `{key}`" if where else f"unknown option `{dash}{key}`"
    return UserError(f"{place}{hint} (`mllm-cl fit --help` lists every option)")


def explain(message: str, parser: argparse.ArgumentParser, args: list[str]) -> UserError:
    """One plain message for a jsonargparse parse error of ``mllm-cl fit ARGS``."""
    files = config_files(args)
    if message.startswith("Problems parsing config"):
        for path in files:
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as e:
                return UserError(f"{path}{_yaml_problem(e)}")
            except OSError:
                continue
    missing = re.search(r'Parser key "config": File does not exist: (.+)', message)  # the path in quotes
    if missing:
        return UserError(f"--config {missing.group(1).strip(QUOTE)}: no such file")
    m = re.match(r'Parser key "([^"]+)":\s*Expected a (.+?)\. Got value: (.*)', message, re.S)
    if m:
        key, kind, value = m.groups()
        kind = re.sub(r"<class '(\w+)'>", r"\1", kind)
        where = file_with(key, files, args)
        return UserError(f"{where + ': ' if where else ''}{key}: expected {kind}, got {value.strip()!r}")
    m = re.search(r"does not accept option '([^']+)'", message)
    if m:
        return _unknown(m.group(1), option_keys(parser), files, option=False, args=args)
    m = re.match(r"unrecognized arguments: (.*)", message)
    if m:
        words = [w[2:].split("=", 1)[0] for w in m.group(1).split() if w.startswith("--")]
        if words:
            return _unknown(words[0], option_keys(parser), files, option=True, args=args)
    m = re.search(r"Option '([^']+)' is not accepted", message)
    classes = re.findall(r"class_path '([^']+)'", message)
    levels = re.findall(r'Parser key "([^"]+)"', message)
    if m and classes and levels:
        base = levels[0] + "".join(f".init_args.{k}" for k in levels[1:])
        names = init_params(classes[-1])
        key = f"{base}.{m.group(1)}"
        guess = nearest(m.group(1), names)
        where = file_with(key, files, args)
        hint = f"; did you mean `{base}.{guess}`?" if guess else f"; it takes: {', '.join(names)}"
        return UserError(f"{where + ': ' if where else ''}unknown key `{key}` ({classes[-1]} has no option "
                         f"`{m.group(1)}`){hint}")
    return UserError(" ".join(message.split()) + " (`mllm-cl fit --help` lists every option)")


def _yaml_problem(e: Exception) -> str:
    """``, line L, column C: not valid YAML: what`` from a PyYAML error (its marks are 0-based)."""
    at = lambda mark: f"line {mark.line + 1}, column {mark.column + 1}"  # noqa: E731
    context, mark = getattr(e, "context", None), getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
    problem, problem_mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if mark is None:
        return f": not valid YAML: {' '.join(str(e).split())}"
    what = ", ".join(x for x in (context, problem) if x)
    later = f" (at {at(problem_mark)})" if problem_mark is not None and problem_mark is not mark else ""
    return f", {at(mark)}: not valid YAML: {what}{later}"
