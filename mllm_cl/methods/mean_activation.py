"""Per-task mean activations: routing-based CL's ``route: mean_activation`` (docs/methods/routing.md).

PHATGOOSE's "average activation" baseline, made continual. At the end of task t, each expert layer's
input over the task's training prompts, from the frozen base model (adapters off), standardized per
token as the gates standardize it (zero mean, unit variance over features, no affine), averaged over
each sample's prompt tokens and then over the samples: the task's mean ``m_t`` per layer, stored and
never changed again. At evaluation each sample's prompt goes once through the base model; per layer
the distance of its pooled standardized input to every seen task's mean, over ``sqrt(d)`` (the
root-mean-square difference per feature, so that wide and narrow layers weigh the same); the sample
goes to the task nearest summed over the layers, and that task's expert serves every layer for the
whole answer. With a ``base`` mean
(the first general task's, taken at the first task's end), one more choice competes: a sample that
matches it best goes to no expert, the base model alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.distributed import all_reduce_sum
from mllm_cl.experts import ExpertLayer, expert_layers
from mllm_cl.methods.locator import base_forward, task_batches

EPS = 1e-5  # the gates' standardization epsilon (PostHocGateRouter)


def prompt_mask(batch: dict) -> torch.Tensor:
    """(B, L) bool: the real tokens before the answer (training batches carry ``labels``; evaluation
    batches are prompts alone)."""
    mask = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if labels is None:
        return mask
    answer = labels != -100
    started = answer.long().cumsum(-1) > 0  # the answer and everything after it
    return mask & ~started


@torch.no_grad()
def pooled_inputs(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Per expert layer, (B, d) float32: each sample's layer input standardized per token and averaged
    over its prompt tokens, from one forward of the prompt through the frozen base (adapters off)."""
    mask = prompt_mask(batch)
    weights = (mask.float() / mask.sum(-1, keepdim=True).clamp(min=1)).unsqueeze(-1)  # (B, L, 1)
    pooled: dict[str, torch.Tensor] = {}

    def hook(name: str, layer: ExpertLayer):
        def record(module, args):
            x = args[0]
            if x.shape[:2] != mask.shape:
                raise ValueError(f"mean activations: {name} sees inputs {tuple(x.shape)}, not one row per token of "
                                 f"the prompt {tuple(mask.shape)}; route: mean_activation needs adapted modules of "
                                 "the language model (experts.target_modules / experts.scope)")
            z = F.layer_norm(x.float(), (layer.in_features,), eps=EPS)
            pooled[name] = (z * weights).sum(1)
        return record

    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in expert_layers(model).items()]
    try:
        base_forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return pooled


def task_means(module, task: int, limit: int | None) -> dict[str, torch.Tensor]:
    """Per expert layer, (d,) float64: the mean of ``pooled_inputs`` over task ``task``'s first ``limit``
    training samples (all: ``None``; ``-1 - j``: general task ``j``). Under DDP each process takes every
    world-size-th of them and the sums are added over processes, so every process gets the same means.
    ``module``: the ContinualMLLM."""
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=module.device)
    for batch in task_batches(module, task, "mean activations", limit):
        for name, rows in pooled_inputs(module.model, batch).items():
            total = rows.double().sum(0)
            sums[name] = total if name not in sums else sums[name] + total
        count += batch["input_ids"].shape[0]
    layers = expert_layers(module.model)
    count = all_reduce_sum(count)
    if not count:
        raise RuntimeError(f"mean activations: task {module.sequence.task_spec(task).name} has no training sample "
                           "to average")
    return {name: all_reduce_sum(sums.get(name, torch.zeros(layer.in_features, dtype=torch.float64,
                                                            device=module.device))) / count
            for name, layer in layers.items()}


class MeanActivations:
    """Every seen task's mean standardized input per expert layer, and the per-sample choice they make;
    ``base``: per layer the general data's mean, one more choice (index ``num_tasks``: no expert)."""

    def __init__(self) -> None:
        self.means: dict[str, list[torch.Tensor]] = {}  # layer -> one (d,) float32 mean per task
        self.base: dict[str, torch.Tensor] = {}  # layer -> the general data's (d,) mean; empty: no base choice

    @property
    def num_tasks(self) -> int:
        return len(next(iter(self.means.values()), []))

    def add_task(self, means: dict[str, torch.Tensor]) -> None:
        if self.means and set(means) != set(self.means):
            raise ValueError(f"mean activations: the new task's layers {sorted(means)[:3]}... differ from the "
                             f"earlier tasks' {sorted(self.means)[:3]}...")
        for name, mean in means.items():
            self.means.setdefault(name, []).append(mean.detach().float().cpu())

    def set_base(self, means: dict[str, torch.Tensor]) -> None:
        self.base = {name: mean.detach().float().cpu() for name, mean in means.items()}

    def distances(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """(layers, B, C): per layer, each sample's pooled input's distance to every choice's mean over
        ``sqrt(d)``; the choices are the tasks, then the base when there is one."""
        out = []
        for name, rows in pooled.items():
            means = torch.stack(self.means[name] + ([self.base[name]] if self.base else [])).to(rows)  # (C, d)
            out.append(torch.cdist(rows, means) / math.sqrt(means.shape[-1]))
        return torch.stack(out)

    def choose(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) the task each sample goes to, the nearest summed over the layers; -1: the base (no expert)."""
        chosen = self.distances(pooled).sum(0).argmin(-1)
        return chosen.masked_fill(chosen == self.num_tasks, -1) if self.base else chosen

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {f"mean_activation.{name}.{t}": m for name, ms in self.means.items() for t, m in enumerate(ms)}
        return {**tensors, **{f"mean_activation_base.{name}": m for name, m in self.base.items()}}

    def load_state(self, tensors: dict[str, torch.Tensor], tasks: int) -> None:
        self.means = {}
        names = {k.removeprefix("mean_activation.").rpartition(".")[0] for k in tensors
                 if k.startswith("mean_activation.")}
        for name in sorted(names):
            self.means[name] = [tensors[f"mean_activation.{name}.{t}"].float() for t in range(tasks)]
        self.base = {k.removeprefix("mean_activation_base."): v.float() for k, v in tensors.items()
                     if k.startswith("mean_activation_base.")}
