"""The ``mllm-cl`` command: one entry point, one subcommand per job.

``fit`` goes to the LightningCLI subclass (issue #4); ``data``, ``report``,
``predict``, ``evaluate``, ``export`` and ``pretrain`` are plain subcommands. A subcommand
that is not built yet says so and exits with status 2 rather than pretending.
A user error (a bad sample, a refused resume, a missing file, a config that
does not parse) is one message and status 2, Ctrl-C status 130; ``--debug``
adds the traceback (``mllm_cl.errors``).
"""

from __future__ import annotations

import argparse
import sys

# Subcommands planned but not built yet, with the issue that builds them.
PLANNED: dict[str, tuple[str, int]] = {}


def plain(doc: str | None) -> str | None:
    """A module docstring as help text: without the reST literal markup (double backquotes) meant for the source."""
    return None if doc is None else doc.replace("``", "")


def _parser() -> argparse.ArgumentParser:
    from mllm_cl import __version__

    ap = argparse.ArgumentParser(
        prog="mllm-cl",
        description="Multimodal continual instruction tuning with mixtures of LoRA experts.",
    )
    ap.add_argument("--version", action="version", version=f"mllm-cl {__version__}")
    ap.add_argument("--debug", action="store_true",
                    help="print the traceback of an error too (anywhere on the command line; or MLLM_CL_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    from mllm_cl import demo
    from mllm_cl.data import cli as data_cli
    from mllm_cl import quickstart
    from mllm_cl.report import cli as report_cli
    from mllm_cl.use import evaluate as evaluate_cli
    from mllm_cl.use import export as export_cli
    from mllm_cl.use import predict as predict_cli

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
    for name, (summary, issue) in PLANNED.items():
        if " " in name:  # a sub-subcommand: its parent lists it
            continue
        sub.add_parser(name, help=f"{summary} (not built yet: issue #{issue})", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    from mllm_cl.errors import run_command, split_debug

    argv, debug = split_debug(sys.argv[1:] if argv is None else list(argv))
    return run_command(lambda: _dispatch(argv), debug=debug)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "fit":  # LightningCLI owns fit's options and its --help
        from mllm_cl.fit import main as fit_main

        return fit_main(argv[1:])
    if argv and argv[0] == "plan":  # fit's parser, options and configs
        from mllm_cl.plan import main as plan_main

        return plan_main(argv[1:])
    if argv and argv[0] == "pretrain":  # jsonargparse owns pretrain's options (a YAML config)
        from mllm_cl.pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    for words in (argv[:2], argv[:1]):  # whatever options follow, the command does not exist yet
        name = " ".join(words)
        if name in PLANNED:
            summary, issue = PLANNED[name]
            print(f"mllm-cl {name}: not built yet ({summary}; tracked in issue #{issue}).", file=sys.stderr)
            return 2
    after: list[str] = []  # evaluate: the fit options after `--`, handed over as they are
    if argv[:1] == ["evaluate"] and "--" in argv:
        argv, after = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    if args.command == "quickstart":
        from mllm_cl import quickstart

        return quickstart.run(args)
    if args.command == "report":
        from mllm_cl.report import cli as report_cli

        return report_cli.run(args)
    if args.command == "predict":
        from mllm_cl.use import predict as predict_cli

        return predict_cli.run(args)
    if args.command == "evaluate":
        from mllm_cl.use import evaluate as evaluate_cli

        return evaluate_cli.run(args, after)
    if args.command == "export":
        from mllm_cl.use import export as export_cli

        return export_cli.run(args)
    if args.command == "data":
        from mllm_cl.data import cli as data_cli

        return data_cli.run(args)
    from mllm_cl import demo

    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
