"""The training progress of one phase, in optimizer steps: ``task 2/4 classify · expert · 120/300 · loss 0.58``.

Lightning's own bars count batches within an "epoch" of a phase whose length is set in steps
(``max_epochs=-1``), which reads ``Epoch 9/-2 ━━━ 12/12``. This bar counts the phase's optimizer
steps against its budget (``trainer.max_steps``) and labels them with the task and phase the
loop is running (``module.progress_label``). On a terminal it is redrawn in place; in a log (no
TTY) it prints a line every ``MLLM_CL_PROGRESS_SECONDS`` (default 30) and one when the phase ends.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from mllm_cl.console import ProgressLine, duration


class PhaseProgressBar(ProgressBar):
    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._line: ProgressLine | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def text(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        label = getattr(pl_module, "progress_label", None) or getattr(pl_module, "log_prefix", "train")
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        parts = [label, f"{trainer.global_step}/{total}"]
        loss = _loss(trainer.progress_bar_metrics)
        if loss is not None:
            parts.append(f"loss {loss:.2f}")
        if self._line is not None:
            parts.append(duration(self._line.elapsed()))
        return " · ".join(parts)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line = ProgressLine(final_line=True, enabled=self._enabled and trainer.is_global_zero)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._line is not None:
            self._line.update(self.text(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._line is not None:
            self._line.close(self.text(trainer, pl_module))
            self._line = None


def _loss(metrics: dict[str, Any]) -> float | None:
    for key, value in metrics.items():
        if key == "loss" or key.endswith("/loss"):
            return float(value)
    return None


def with_phase_progress(callbacks: list, trainer_options: dict[str, Any], configured=()) -> list:
    """``callbacks`` for one phase's Trainer with this bar in place of Lightning's default one.

    ``configured`` are the callbacks the config lists: a progress bar there is the user's choice
    and stays (and this bar is not added); one Lightning added by default is dropped.
    ``enable_progress_bar: false`` means no bar at all.
    """
    configured = list(configured or [])
    kept = [c for c in callbacks if not isinstance(c, ProgressBar) or any(c is k for k in configured)]
    if trainer_options.get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in kept):
        return kept
    return [*kept, PhaseProgressBar()]
