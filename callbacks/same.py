"""SAME's statistics callback: after every optimizer step, the covariance and activation statistics.

A thin shell: the statistics live in ``mllm_cl.methods.same`` (``SAME.observe``).
The method adds it itself (``SAME.callbacks``); nothing to configure.
"""

from __future__ import annotations

from mllm_cl.callbacks.base import ContinualCallback


class SAMEStatisticsCallback(ContinualCallback):
    def __init__(self, method) -> None:
        self.method = method

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not batch.get("empty"):
            self.method.observe(pl_module.model)
