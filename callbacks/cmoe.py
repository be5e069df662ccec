"""LLaVA-CMoE's callbacks: probe statistics during the probe phase, the task locator at task end.

Thin shells: the counting and the fitting live in the method
(``LLaVACMoE.observe_probe_batch``, ``LLaVACMoE.fit_locator``). The method adds both to every
run (``LLaVACMoE.callbacks``); nothing to configure.
"""

from __future__ import annotations

from mllm_cl.callbacks.base import ContinualCallback


class ProbeStatistics(ContinualCallback):
    """After every training batch of a probe phase, count the top-k slots each expert won."""

    def __init__(self, method) -> None:
        self.method = method

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.method.probing and not batch.get("empty"):
            self.method.observe_probe_batch(pl_module.model, batch)


class TaskLocatorFitter(ContinualCallback):
    """At task end: the method fits the task's locator (``LLaVACMoE.fit_locator``)."""

    def __init__(self, method) -> None:
        self.method = method

    def on_task_end(self, module, task: int) -> None:
        self.method.fit_locator(module, task)
