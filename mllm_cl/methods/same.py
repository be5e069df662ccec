"""SAME: stabilized mixture of LoRA experts (methods.md, section 2).

MoE-LoRA on the FFN linears: ``num_experts`` experts of rank ``experts.rank``
per layer under a ``BatchMeanRouter`` (training: one softmax weight vector per
micro-batch; evaluation: logits / E, per-sample sequence mean, top-2). Every
expert stays trainable; three parts stabilize it, each switchable for ablations:

- ``spectral_routing``: the router gradient is rewritten along the top
  directions of the layer's input covariance (``router_rewrite``), from step
  ``warmup_steps`` of each task, directions refreshed every ``refresh_every`` steps;
- ``curvature_scaling``: from task 2 on, every expert's A gradient is rescaled
  by the covariance snapshot taken at the end of the previous task
  (``expert_rewrite``); B is not rescaled;
- ``adaptive_activation``: per layer, EMAs of utilization (reset every task) and
  importance (carried across tasks) mask experts whose
  ``minmax(u) - minmax(f)`` is below ``mask_threshold``, except the current
  task's; masks are recomputed after every step until every other expert is
  masked, then kept until the task ends. Masked experts get no gradient.

Statistics (``SAMEStatistics``, one per adapted layer, registered on the layer
as ``same``) are buffers: they are saved with the adapters, and under ``ddp``
every process adds the rows and sums of all processes, so they stay identical.

[choice] values (methods.md): the covariance is centred; ``covariance: running``
accumulates it over all tasks (the paper), ``batch`` re-estimates the router's
directions from the current batch at each refresh (the public code; the expert
snapshot still uses the running one); ``mu`` is absolute unless
``mu_relative``. At most ``stat_tokens`` real tokens per process and step feed
the covariance (evenly spaced). The public code's ``mixing="factorized"`` is not built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mllm_cl.distributed import all_gather_rows, all_reduce_sum
from mllm_cl.experts import BatchMeanRouter, CovarianceSketch, ExpertLayer, ExpertSetup, RoutingContext, expert_layers
from mllm_cl.experts.spectral import expert_rewrite, kept_directions, router_rewrite
from mllm_cl.methods.base import Method


def minmax(v: torch.Tensor) -> torch.Tensor:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.zeros_like(v)


class SAMEStatistics(nn.Module):
    """One adapted layer's statistics: input covariance, the previous task's snapshot, activation EMAs."""

    def __init__(self, dim: int, num_experts: int, rank: int) -> None:
        super().__init__()
        self.covariance = CovarianceSketch(dim, rank)
        f64 = dict(dtype=torch.float64)
        self.register_buffer("snapshot_directions", torch.zeros(dim, rank, **f64))
        self.register_buffer("snapshot_sigma", torch.zeros(rank, **f64))
        self.register_buffer("snapshot_k", torch.zeros((), dtype=torch.long))
        self.register_buffer("utilization", torch.zeros(num_experts, **f64))
        self.register_buffer("importance", torch.zeros(num_experts, **f64))
        self.register_buffer("importance_seen", torch.zeros((), dtype=torch.bool))
        self.router_directions: torch.Tensor | None = None  # (d, k) refreshed from the covariance
        self.router_sigma: torch.Tensor | None = None
        self.utilization_seen = False
        self.masks_final = False


class SAME(Method):
    """Args:
        experts: FFN targets and the expert rank (the router is built here).
        num_experts: experts per layer (the paper: E = number of tasks).
        delta: share of the covariance trace the kept directions must explain.
        max_directions: K, the cap on kept directions (and the sketch's rank).
        refresh_every: steps between refreshes of the router's directions.
        warmup_steps: steps of each task before the router rewrite starts.
        mu: the curvature scaling's damping (absolute, or times mean(S) with ``mu_relative``).
        covariance: ``running`` (across tasks) or ``batch`` (the current batch) for the router.
        ema_decay: decay of the utilization / importance EMAs.
        mask_threshold: experts scoring below it are masked.
        stat_tokens: real tokens per process and step added to the covariance.
        spectral_routing, curvature_scaling, adaptive_activation: the three parts (ablations).
    """

    name = "same"

    def __init__(self, experts: ExpertSetup, *, num_experts: int = 4, delta: float = 0.9, max_directions: int = 64,
                 refresh_every: int = 20, warmup_steps: int = 10, mu: float = 0.9, mu_relative: bool = False,
                 covariance: str = "running", ema_decay: float = 0.95, mask_threshold: float = 0.1,
                 stat_tokens: int = 256, spectral_routing: bool = True, curvature_scaling: bool = True,
                 adaptive_activation: bool = True) -> None:
        if experts.router is not None or experts.initial_experts:
            raise ValueError("same builds its own router and experts: leave experts.router and "
                             "experts.initial_experts unset")
        if num_experts < 2:
            raise ValueError(f"same: num_experts must be >= 2, got {num_experts}")
        if covariance not in ("running", "batch"):
            raise ValueError(f"same: covariance must be 'running' or 'batch', got {covariance!r}")
        if not 0 < delta <= 1 or max_directions < 1 or refresh_every < 1 or mu <= 0:
            raise ValueError("same: need 0 < delta <= 1, max_directions >= 1, refresh_every >= 1 and mu > 0")
        experts.router = BatchMeanRouter
        super().__init__(experts)
        self.num_experts, self.delta, self.max_directions = num_experts, delta, max_directions
        self.refresh_every, self.warmup_steps = refresh_every, warmup_steps
        self.mu, self.mu_relative, self.covariance = mu, mu_relative, covariance
        self.ema_decay, self.mask_threshold, self.stat_tokens = ema_decay, mask_threshold, stat_tokens
        self.spectral_routing, self.curvature_scaling = spectral_routing, curvature_scaling
        self.adaptive_activation = adaptive_activation
        self.task, self.steps = 0, 0

    # --------------------------------------------------------------- structure
    def build(self, model: nn.Module):
        report = super().build(model)
        for layer in expert_layers(model).values():
            stats = SAMEStatistics(layer.in_features, self.num_experts, self.max_directions)
            layer.add_module("same", stats.to(layer.base_layer.weight.device))
            layer.keep_input = True
            layer.register_gradient_transform(self.rewrite_gradients)
        return report

    def callbacks(self) -> list:
        from callbacks.same import SAMEStatisticsCallback

        return [SAMEStatisticsCallback(self)]

    def on_task_start(self, model: nn.Module, task: int) -> None:
        if task == 0:
            for i in range(self.num_experts):
                self.add_expert_everywhere(model, f"e{i}")
        self.task, self.steps = task, 0
        for layer in expert_layers(model).values():
            stats = layer.same
            stats.utilization.zero_()
            stats.utilization_seen, stats.masks_final = False, False
            stats.router_directions = stats.router_sigma = None
            layer.routers["default"].masked = set()
            layer.requires_grad_(True)
            layer.base_layer.requires_grad_(False)

    def current_expert(self) -> str:
        return f"e{min(self.task, self.num_experts - 1)}"

    def on_task_end(self, model: nn.Module, task: int) -> None:
        """Snapshot each layer's input covariance for the next task's expert scaling."""
        for layer in expert_layers(model).values():
            stats = layer.same
            vecs, vals, trace = stats.covariance.eig()
            k = kept_directions(vals, trace, self.delta, self.max_directions)
            stats.snapshot_directions.zero_()[:, :k] = vecs[:, :k]
            stats.snapshot_sigma.zero_()[:k] = vals[:k].sqrt()
            stats.snapshot_k.fill_(k)
            layer.routers["default"].masked = set()

    # ------------------------------------------------------------------- steps
    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext | None:
        # Training routes on every real token of the micro-batch (the answer too), not only the prompt.
        return RoutingContext(extra={"attention_mask": batch["attention_mask"]}) if training else None

    def rewrite_gradients(self, layer: ExpertLayer) -> None:
        """Between backward and the optimizer step (``ExpertLayer.apply_gradient_transforms``)."""
        router, stats = layer.routers["default"], layer.same
        for name in router.masked:  # masked: no gradient at all, so AdamW cannot move it
            for p in [*layer.experts[name].parameters(), *router.expert_parameters(name)]:
                p.grad = None
        if self.spectral_routing and self.steps >= self.warmup_steps and stats.router_directions is not None:
            names = [n for n in router.expert_names if router.rows[n].grad is not None]
            if names:
                grad = torch.stack([router.rows[n].grad for n in names])  # (E', d)
                dirs = stats.router_directions.to(grad.dtype)
                new = router_rewrite(grad, dirs, stats.router_sigma.to(grad.dtype))
                for n, g in zip(names, new):
                    router.rows[n].grad = g.clone()
        k = int(stats.snapshot_k)
        if self.curvature_scaling and k > 0:
            sigma = stats.snapshot_sigma[:k]
            mu = self.mu * float(sigma.mean()) if self.mu_relative else self.mu
            for expert in layer.experts.values():
                if expert.A.grad is not None:
                    g = expert.A.grad
                    expert.A.grad = expert_rewrite(g.double(), stats.snapshot_directions[:, :k], sigma, mu).to(g.dtype)

    @torch.no_grad()
    def observe(self, model: nn.Module, attention_mask: torch.Tensor) -> None:
        """After an optimizer step: covariance, router directions, activation EMAs and masks."""
        for layer in expert_layers(model).values():
            x, routing = layer.last_input, layer.last_routing
            if x is None or routing is None or routing.probs is None:
                continue
            real = attention_mask.reshape(-1).bool()
            tokens = x.reshape(-1, x.shape[-1])[real].double()  # (N, d)
            probs = routing.probs.reshape(-1, routing.probs.shape[-1])[real].double()  # (N, E)
            self._covariance(layer.same, tokens)
            self._activation(layer, tokens, probs)
        self.steps += 1

    def _covariance(self, stats: SAMEStatistics, tokens: torch.Tensor) -> None:
        if tokens.shape[0] > self.stat_tokens:
            tokens = tokens[torch.linspace(0, tokens.shape[0] - 1, self.stat_tokens, device=tokens.device).long()]
        rows = all_gather_rows(tokens)
        stats.covariance.update(rows)
        if self.spectral_routing and self.steps % self.refresh_every == 0:
            sketch = stats.covariance
            if self.covariance == "batch":
                sketch = CovarianceSketch(rows.shape[1], self.max_directions).to(rows.device)
                sketch.update(rows)
            vecs, vals, trace = sketch.eig()
            k = max(1, kept_directions(vals, trace, self.delta, self.max_directions))
            stats.router_directions, stats.router_sigma = vecs[:, :k], vals[:k].sqrt()

    def _activation(self, layer: ExpertLayer, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        stats, router = layer.same, layer.routers["default"]
        sums = torch.cat([probs.sum(0), (probs * tokens.square().sum(-1, keepdim=True)).sum(0),
                          probs.new_tensor([probs.shape[0]])])
        sums = all_reduce_sum(sums)  # every process's tokens
        E = probs.shape[1]
        n = sums[-1].clamp(min=1)
        u, f = sums[:E] / n, sums[E:2 * E] / n
        d = self.ema_decay
        stats.utilization.copy_(d * stats.utilization + (1 - d) * u if stats.utilization_seen else u)
        stats.importance.copy_(d * stats.importance + (1 - d) * f if bool(stats.importance_seen) else f)
        stats.utilization_seen = True
        stats.importance_seen.fill_(True)
        if not self.adaptive_activation or stats.masks_final:
            return
        score = minmax(stats.utilization) - minmax(stats.importance)
        current = self.current_expert()
        router.masked = {n for n, s in zip(router.expert_names, score.tolist()) if s < self.mask_threshold
                         and n != current}
        stats.masks_final = len(router.masked) == len(router.expert_names) - 1
