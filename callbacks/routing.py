"""Routing-based CL's callback: with ``route: mean_activation``, the task's mean activations at task end.

A thin shell: the pass over the task's data lives in the method (``RoutingCL.fit_mean_activations``),
which adds this callback to the run by itself; nothing to configure.
"""

from __future__ import annotations

from mllm_cl.callbacks.base import ContinualCallback


class MeanActivationFitter(ContinualCallback):
    """At task end: the method stores the task's mean standardized input per expert layer."""

    def __init__(self, method) -> None:
        self.method = method

    def on_task_end(self, module, task: int) -> None:
        self.method.fit_mean_activations(module, task)
