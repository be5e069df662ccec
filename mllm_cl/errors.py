"""User errors: the one base class of every problem in what the user gave.

A user error is a problem in a config, an option or an input: a bad sample
(``mllm_cl.data.errors.BadSampleError`` names the file and record), a run
directory that holds another config (``mllm_cl.system.run_dir.ConfigMismatch``),
a config or option that does not parse. Each subclasses ``UserError``; its
message says what is wrong and where. The ``mllm-cl`` command (``mllm_cl.cli``)
prints it as one line, ``mllm-cl: error: ...``, and exits with status 2, without
the traceback unless asked for (``--debug``); a missing file
(``FileNotFoundError``) is treated the same.

This module imports nothing from the project, so every layer can raise one.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem in a config, an option or an input; the message says what and where."""
