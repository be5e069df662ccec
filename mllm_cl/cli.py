"""The ``mllm-cl`` command: one entry point, one subcommand per job.

``fit`` and ``plan`` go to the LightningCLI subclass that parses fit's configs, ``pretrain`` to its
own YAML parser; ``data``, ``report``, ``predict``, ``evaluate``, ``export``, ``demo`` and
``quickstart`` are plain subcommands.
A user error (``mllm_cl.errors.UserError``: a bad sample, a refused resume, a
config that does not parse; or a missing file) is one message,
``mllm-cl: error: ...``, and status 2, without the traceback, which says nothing
to the user and buries the one line that does. ``--debug`` (any place on the
command line) or ``MLLM_CL_DEBUG=1`` prints the traceback too. Ctrl-C prints
where the run stopped (``mllm_cl.system.interrupt``) and exits with status 130.
Anything else is a bug and keeps Python's own traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from mllm_cl import __version__, quickstart
from mllm_cl.data import cli as data_cli
from mllm_cl.errors import UserError
from mllm_cl.report import cli as report_cli
from mllm_cl.use import evaluate as evaluate_cli
from mllm_cl.use import export as export_cli
from mllm_cl.use import predict as predict_cli

DEBUG_ENV = "MLLM_CL_DEBUG"
DEBUG_FLAG = "--debug"

#: What the command reports as one message and status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def plain(doc: str | None) -> str | None:
    """A module docstring as help text: without the reST literal markup (double backquotes) meant for the source."""
    return None if doc is None else doc.replace("``", "")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mllm-cl",
        description="Multimodal continual instruction tuning with mixtures of LoRA experts.",
    )
    ap.add_argument("--version", action="version", version=f"mllm-cl {__version__}")
    ap.add_argument("--debug", action="store_true",
                    help="print the traceback of an error too (anywhere on the command line; or MLLM_CL_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    from mllm_cl import demo  # heavy: torch and transformers, for the commands that parse here only

    quickstart.add_arguments(sub.add_parser("quickstart", help=quickstart.HELP, description=plain(quickstart.__doc__),
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    demo.add_arguments(sub.add_parser("demo", help=demo.HELP, description=plain(demo.__doc__),
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    report_cli.add_arguments(sub.add_parser("report", help=report_cli.HELP, description=plain(report_cli.__doc__)))
    predict_cli.add_arguments(sub.add_parser("predict", help=predict_cli.HELP, description=plain(predict_cli.__doc__),
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    evaluate_cli.add_arguments(sub.add_parser("evaluate", help=evaluate_cli.HELP,
                                              description=plain(evaluate_cli.__doc__),
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    export_cli.add_arguments(sub.add_parser("export", help=export_cli.HELP, description=plain(export_cli.__doc__),
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    data_cli.add_arguments(sub.add_parser("data", help=data_cli.HELP, description=plain(data_cli.__doc__),
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.add_parser("fit", help="run a continual task sequence from YAML configs (see `mllm-cl fit --help`)",
                   add_help=False)
    sub.add_parser("plan", help="what a fit will cost (steps, parameters, state, evaluation, memory per GPU), on the "
                   "CPU before it runs; fit's configs and options (see `mllm-cl plan --help`)", add_help=False)
    sub.add_parser("pretrain", help="pretrain the tiny base on synthetic captions (see `mllm-cl pretrain --help`)",
                   add_help=False)
    return ap


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether tracebacks are wanted (the flag or the variable)."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [a for a in argv if a != DEBUG_FLAG], debug


def run_command(fn: Callable[[], int], *, debug: bool) -> int:
    """``fn()``'s status, or 2 after a user error's message, or 130 after Ctrl-C."""
    try:
        return fn()
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        print(f"mllm-cl: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"mllm-cl: error: {e}", file=sys.stderr)
        if not debug:
            print(f"(run again with {DEBUG_FLAG}, or with {DEBUG_ENV}=1, for the traceback)", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(sys.argv[1:] if argv is None else list(argv))
    return run_command(lambda: _dispatch(argv), debug=debug)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "fit":  # LightningCLI owns fit's options and its --help
        from mllm_cl.fit import main as fit_main  # heavy: lightning, for `mllm-cl fit` only

        return fit_main(argv[1:])
    if argv and argv[0] == "plan":  # fit's parser, options and configs
        from mllm_cl.plan import main as plan_main  # heavy: lightning, for `mllm-cl plan` only

        return plan_main(argv[1:])
    if argv and argv[0] == "pretrain":  # jsonargparse owns pretrain's options (a YAML config)
        from mllm_cl.pretrain import main as pretrain_main  # heavy: torch, for `mllm-cl pretrain` only

        return pretrain_main(argv[1:])
    after: list[str] = []  # evaluate: the fit options after `--`, handed over as they are
    if argv[:1] == ["evaluate"] and "--" in argv:
        argv, after = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    if args.command == "quickstart":
        return quickstart.run(args)
    if args.command == "report":
        return report_cli.run(args)
    if args.command == "predict":
        return predict_cli.run(args)
    if args.command == "evaluate":
        return evaluate_cli.run(args, after)
    if args.command == "export":
        return export_cli.run(args)
    if args.command == "data":
        return data_cli.run(args)
    from mllm_cl import demo  # heavy: torch and transformers, for `mllm-cl demo` only (imported by _parser)

    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
