"""Bad input: one error type that names the file and record, and a log of skipped samples.

``on_bad_sample: raise`` (the default) stops at the first bad sample with a
``BadSampleError``; ``skip`` leaves the sample out, counts it by reason and
reports the counts at the end of the task. Never a silent wrong sample.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from mllm_cl.errors import UserError

log = logging.getLogger("mllm_cl.data")

OnBadSample = Literal["raise", "skip"]


class BadSampleError(UserError):
    """A sample that cannot be used; the message names the file and record."""

    def __init__(self, source: str, reason: str | None = None, record: int | str | None = None) -> None:
        if reason is None:
            # One argument: a whole message. DataLoader workers re-raise an exception in the main
            # process as ``type(e)(message)``; this keeps it a BadSampleError there.
            super().__init__(source)
            self.source, self.reason, self.record = "", source, None
            return
        where = source if record is None else f"{source}, record {record}"
        super().__init__(f"{where}: {reason}")
        self.source, self.reason, self.record = source, reason, record


@dataclass
class SkipLog:
    """Skipped samples of one task, counted by reason (the first few kept verbatim)."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    keep: int = 5

    def add(self, error: BadSampleError) -> None:
        self.counts[error.reason.split(":")[0]] += 1
        if len(self.examples) < self.keep:
            self.examples.append(str(error))
        log.warning("skipped bad sample: %s", error)

    def extend(self, messages: list[str]) -> None:
        """Skips reported by a batch (from a worker process), as ``str(BadSampleError)``."""
        for message in messages:
            reason = message.split(": ", 1)[-1]
            self.counts[reason.split(":")[0]] += 1
            if len(self.examples) < self.keep:
                self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self, task: str) -> str:
        """The counts by reason and the first examples, one line each; "" when nothing was skipped."""
        if not self.total:
            return ""
        lines = [f"task {task}: skipped {self.total} bad samples"]
        lines += [f"  {n} x {reason}" for reason, n in self.counts.most_common()]
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)


def handle(error: BadSampleError, on_bad_sample: OnBadSample, skips: SkipLog | None) -> None:
    """Raise or record ``error`` as the option says."""
    if on_bad_sample == "raise":
        raise error
    if on_bad_sample != "skip":
        raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
    if skips is not None:
        skips.add(error)
