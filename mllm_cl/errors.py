"""User errors: one clean message and exit status 2; the traceback only when asked for.

A user error is a problem in what the user gave: a bad sample (``BadSampleError``
names the file and record), a run directory that holds another config
(``ConfigMismatch``), a missing file, a config or option that does not parse
(``UserError``). The ``mllm-cl`` command prints its message as
``mllm-cl: error: ...`` and exits with status 2, without the traceback, which
says nothing to the user and buries the one line that does. ``--debug`` (any
place on the command line) or ``MLLM_CL_DEBUG=1`` prints the traceback too.

Ctrl-C prints where the run stopped (``mllm_cl.system.interrupt``) and exits
with status 130. Anything else is a bug and keeps Python's own traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

DEBUG_ENV = "MLLM_CL_DEBUG"
DEBUG_FLAG = "--debug"


class UserError(ValueError):
    """A problem in a config, an option or an input; the message says what and where."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported here: the command's own start stays light, and these modules import torch.
    from mllm_cl.data.errors import BadSampleError
    from mllm_cl.system.run_dir import ConfigMismatch

    return UserError, BadSampleError, ConfigMismatch, FileNotFoundError


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
    except Exception as e:
        if not isinstance(e, _user_error_types()):
            raise
        if debug:
            traceback.print_exc()
        print(f"mllm-cl: error: {e}", file=sys.stderr)
        if not debug:
            print(f"(run again with {DEBUG_FLAG}, or with {DEBUG_ENV}=1, for the traceback)", file=sys.stderr)
        return 2
