"""A run's model rebuilt without the lines that building it for a fit prints.

``restore_quietly`` is ``mllm_cl.system.restore.restore`` without Lightning's ``Seed set to N``
(the config's seed is set; saying so is a fit's business) and without the check line of the task
files (``mllm-cl: data: files of N tasks checked ...``). Any other line the build prints is
printed as it would be. ``verbose=True`` prints everything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

#: The start of the line ``mllm-cl fit`` prints after reading every task's files.
DATA_CHECK = "mllm-cl: data: files of "
_SEED_LOGGER = "lightning.fabric.utilities.seed"


class _DropSeedLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Seed set to " not in str(record.getMessage())


@contextlib.contextmanager
def quiet_build(verbose: bool = False) -> Iterator[None]:
    """Inside: no seed log line, and stdout without the data-check line (held until the end)."""
    if verbose:
        yield
        return
    logger, drop, held = logging.getLogger(_SEED_LOGGER), _DropSeedLine(), io.StringIO()
    logger.addFilter(drop)
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        logger.removeFilter(drop)
        sys.stdout.writelines(line for line in held.getvalue().splitlines(keepends=True)
                              if not line.startswith(DATA_CHECK))
        sys.stdout.flush()


def restore_quietly(run_dir: str | Path, stage: int | None = None, *, device: str | None = None,
                    overrides: list[str] = (), verbose: bool = False):
    """``restore(run_dir, stage, device=..., overrides=...)`` under ``quiet_build(verbose)``."""
    from mllm_cl.system.restore import restore  # heavy: torch and lightning; the commands load without them

    with quiet_build(verbose):
        return restore(run_dir, stage, device=device, overrides=overrides)
