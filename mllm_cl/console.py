"""What a run prints: our own lines, progress that works on a terminal and in a log file, and
no third-party chatter that is not the user's business.

``quiet_third_party()`` (called once by ``mllm-cl fit``) silences, each by its message and the
module that emits it, never by category or globally:

- Lightning's ``isinstance(treespec, LeafSpec)`` deprecation (a FutureWarning torch raises inside
  ``lightning.pytorch.utilities._pytree``; Lightning's to fix, nothing a user can act on);
- Lightning's per-Trainer info lines ``GPU available: ...``, ``TPU available: ...`` (the loop
  builds one Trainer per phase, so they repeat; the run's first line names the device instead)
  and its "litlogger" advertisement;
- transformers' ``Loading weights`` bars (a few milliseconds for every model load).

Every other warning and log line still shows.

``ProgressLine`` is one line of progress: redrawn in place on a terminal; when the output is a
pipe or a file, a plain line every ``interval`` seconds (``MLLM_CL_PROGRESS_SECONDS``, default
30) and, if asked, one at the end, so a long phase never goes silent in a log. ``Progress`` counts
a command's items on one (``data synth``, ``data shard``, ``demo``): ``desc 120/300 img (40%) · 3s``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import TextIO

#: Lightning info lines that say nothing a run's own lines do not (matched at the start of the message).
_LIGHTNING_INFO = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip: For seamless cloud logging")
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropLightningInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_LIGHTNING_INFO)


_FILTER = _DropLightningInfo()


def quiet_third_party() -> None:
    """Silence the third-party lines listed in the module docstring (idempotent)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    try:
        from transformers.utils import logging as hf_logging  # heavy: commands that load no model import this
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()  # the weight-loading bars; transformers' warnings stay on


def progress_interval() -> float:
    """Seconds between progress lines when the output is not a terminal."""
    try:
        return max(0.0, float(os.environ.get("MLLM_CL_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


class ProgressLine:
    """One line of progress on ``stream`` (stderr by default).

    ``update(text)`` redraws it in place on a terminal (at most every 0.1 s); elsewhere it prints
    ``text`` as a line when ``interval`` seconds have passed since the last one. ``close(text)``
    ends it: on a terminal the last text stays as a line if ``final_line``, else the line is
    erased; elsewhere ``text`` is printed when ``final_line`` (a phase's summary) or when a line
    was printed before (so a log shows where it ended).
    """

    def __init__(self, *, stream: TextIO | None = None, interval: float | None = None, final_line: bool = False,
                 enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = progress_interval() if interval is None else interval
        self.final_line, self.enabled = final_line, enabled
        self._start = self._last = time.monotonic()
        self._width = 0
        self._printed, self._last_text = False, None

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def due(self) -> bool:
        """Whether ``update`` would show its text now."""
        return self.enabled and time.monotonic() - self._last >= (0.1 if self.tty else self.interval)

    def update(self, text: str, *, force: bool = False) -> None:
        if not self.enabled or not (force or self.due()):
            return
        if self.tty:
            self._draw(text)
        else:
            self._line(text)
        self._last = time.monotonic()

    def close(self, text: str | None = None) -> None:
        if not self.enabled:
            return
        if self.tty:
            if self.final_line and text is not None:
                self._draw(text)
                self.stream.write("\n")
            elif self._width:
                self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        elif text is not None and (self.final_line or self._printed) and text != self._last_text:
            self._line(text)
        self.enabled = False

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self.stream.flush()
        self._width = len(text)

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self._printed, self._last_text = True, text


class Progress:
    """Items done of ``total`` on a ``ProgressLine`` that ends with a line: ``desc 120/300 img (40%) · note · 3s``.

    ``update(n, note=...)`` counts ``n`` more items (``note``: a short status such as the loss, kept until
    replaced); ``close()`` ends the line. ``enabled=False`` shows nothing. Usable as a context manager.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, enabled: bool = True,
                 stream: TextIO | None = None, interval: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.note = 0, ""
        self.line = ProgressLine(stream=stream, interval=interval, final_line=True, enabled=enabled)

    def text(self) -> str:
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        parts = [f"{self.desc} {self.n}/{self.total} {self.unit}{share}", self.note,
                 duration(self.line.elapsed())]
        return " · ".join(p for p in parts if p)

    def update(self, n: int = 1, *, note: str | None = None) -> None:
        self.n += n
        if note is not None:
            self.note = note
        if self.line.due():
            self.line.update(self.text())

    def close(self) -> None:
        self.line.close(self.text())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
