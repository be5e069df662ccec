"""LLaVA-CMoE's callbacks: probe statistics during the probe phase, the task locator at task end.

Thin shells: the counting and the fitting live in ``mllm_cl.methods.cmoe``
and ``mllm_cl.methods.locator``. The method adds both to every run
(``LLaVACMoE.callbacks``); nothing to configure.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from mllm_cl.callbacks.base import ContinualCallback
from mllm_cl.data.collate import batch_to
from mllm_cl.distributed import is_writer, world
from mllm_cl.methods.locator import prompt_features


class ProbeStatistics(ContinualCallback):
    """After every training batch of a probe phase, count the top-k slots each expert won."""

    def __init__(self, method) -> None:
        self.method = method

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.method.probing and not batch.get("empty"):
            self.method.observe_probe_batch(pl_module.model, batch)


class TaskLocatorFitter(ContinualCallback):
    """At task end: the frozen base's features of the task's training samples -> the task's locator
    (each process computes its share; ``fit_task`` gathers or sums them)."""

    def __init__(self, method) -> None:
        self.method = method

    def on_task_end(self, module, task: int) -> None:
        dm = module.sequence
        data = dm.train_dataset(task)
        rank, size = world()
        mine = Subset(data, range(rank, len(data), size))  # this process's share; the locator combines them
        loader = DataLoader(mine, batch_size=dm.eval_batch_size, shuffle=False, collate_fn=dm.train_collate,
                            num_workers=dm.num_workers)
        was_training = module.model.training
        module.model.eval()
        feats, index = [], []
        for batch in tqdm(loader, desc=f"task locator: features of {dm.tasks[task].name}", leave=False,
                          disable=None if is_writer() else True):
            if batch.get("empty"):
                continue
            index += batch["index"]
            batch = batch_to(batch, module.device)
            feats.append(prompt_features(module.model, batch))
        module.model.train(was_training)
        self.method.locator.fit_task(torch.cat(feats), torch.tensor(index, device=feats[0].device),
                                     seed=dm.task_seed(task))
