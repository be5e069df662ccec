"""SAME: stabilized mixture of LoRA experts (arXiv 2602.01990).

MoE-LoRA on the FFN linears, every expert trainable on every task under one ``BatchMeanRouter``
per layer, stabilized by spectral-aware router updates, curvature-aware scaling of the experts' A
gradients and adaptive expert activation (masks); at evaluation a task prior from the authors' code
(the cosine of a sample's frozen features to each task's training mean) weights the router's choice.

Hooks: ``build`` (per layer the ``SAMEStatistics`` buffers, an observer on the training forward and
the gradient rewrites), ``on_task_start`` (the experts on the first task; statistics reset, masks),
``routing_context`` (the prior's anchors in training; the prior, or the oracle's true task, at
evaluation), ``SAMEStatisticsCallback`` calling ``observe`` after every optimizer step (EMAs, masks),
``on_task_end`` (the covariance snapshot, the anchors, the ``drift`` stage metric).

See docs/methods/same.md: the algorithm, where it follows the authors' code and where it departs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.callbacks.same import SAMEStatisticsCallback
from mllm_cl.distributed import all_reduce_sum
from mllm_cl.experts import BatchMeanRouter, CovarianceSketch, ExpertLayer, ExpertSetup, RoutingContext, expert_layers
from mllm_cl.experts.routing import index_on
from mllm_cl.experts.spectral import expert_rewrite, kept_directions, kept_mask, range_finder, router_rewrite
from mllm_cl.methods.base import Method, choice_metrics
from mllm_cl.methods.routing_encoder import RoutingEncoder, RoutingFeatures
from mllm_cl.methods.same_drift import DriftMeter

#: ``RoutingContext.cache`` key of a training forward's statistics rows (``SAME.statistics_rows``).
STAT_ROWS = "same_statistics_rows"


def minmax(v: torch.Tensor) -> torch.Tensor:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.zeros_like(v)


def activation_sums(tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(2E + 1,): per expert the routing mass and the mass times each token's squared norm, then the
    token count, over (N, d) tokens routed by (N, E) probabilities; summed over processes, they give
    the utilization and importance EMAs' batch values."""
    norms = tokens.square().sum(-1, keepdim=True)  # (N, 1)
    return torch.cat([probs.sum(0), (probs * norms).sum(0), probs.new_full((1,), probs.shape[0])])


class SAMEStatistics(nn.Module):
    """One adapted layer's statistics: the input covariance's directions, the previous task's snapshot,
    activation EMAs. ``running``: the covariance over every task so far, a float32 Frequent Directions
    sketch (``covariance``); otherwise only the last local estimate is kept."""

    def __init__(self, dim: int, num_experts: int, rank: int, *, running: bool = False, seed: int = 0) -> None:
        super().__init__()
        if running:
            self.covariance = CovarianceSketch(dim, rank, dtype=torch.float32, shrink=True)
        f64 = dict(dtype=torch.float64)
        self.register_buffer("snapshot_directions", torch.zeros(dim, rank))
        self.register_buffer("snapshot_sigma", torch.zeros(rank))
        self.register_buffer("snapshot_k", torch.zeros((), dtype=torch.long))
        self.register_buffer("utilization", torch.zeros(num_experts, **f64))
        self.register_buffer("importance", torch.zeros(num_experts, **f64))
        self.register_buffer("importance_seen", torch.zeros((), dtype=torch.bool))
        self.router_directions: torch.Tensor | None = None  # (d, k) refreshed from the covariance
        self.router_sigma: torch.Tensor | None = None
        self.router_kept: torch.Tensor | None = None  # (K,) which of the router's directions count
        self.local: tuple[torch.Tensor, torch.Tensor] | None = None  # the last local estimate: (d, K), (K,)
        self.seed = seed  # this layer's test matrices: the same on every process
        self.refreshed_at, self.refreshes = -1, 0  # the step of the last refresh; refreshes so far
        self.utilization_seen = False
        self.masks_final = False
        self._snapshot_host: tuple | None = None  # (the buffers' versions, k, mean sigma)

    def snapshot(self) -> tuple[int, float]:
        """(k, mean of the kept sigmas) of the previous task's snapshot on the host, read from the device
        again only after the buffers changed (a new snapshot, a loaded state), not in every step."""
        if self._snapshot_host is None or self._snapshot_host[0] != self._snapshot_key():
            k = int(self.snapshot_k)
            self._snapshot_host = (self._snapshot_key(), k, float(self.snapshot_sigma[:k].mean()) if k else 0.0)
        return self._snapshot_host[1:]

    def set_snapshot(self, directions: torch.Tensor, sigma: torch.Tensor) -> None:
        """The snapshot's k kept directions (d, k) and their sigmas (k,), kept on the host too (``snapshot``)."""
        k = sigma.numel()
        self.snapshot_directions.zero_()[:, :k] = directions
        self.snapshot_sigma.zero_()[:k] = sigma
        self.snapshot_k.fill_(k)
        self._snapshot_host = (self._snapshot_key(), k, float(self.snapshot_sigma[:k].mean()) if k else 0.0)

    def _snapshot_key(self) -> tuple:
        return (self.snapshot_k._version, self.snapshot_k.data_ptr(), self.snapshot_sigma._version,
                self.snapshot_sigma.data_ptr())


class SAME(Method):
    """SAME: MoE-LoRA stabilized by spectral routing, curvature scaling and expert masks (docs/methods/same.md).

    Args:
        experts: FFN targets and the expert rank (the router is built here).
        num_experts: experts per layer (the paper: E = number of tasks).
        delta: share of the covariance trace the kept directions must explain.
        max_directions: K, the cap on kept directions (and the sketch's rank).
        refresh_every: steps between refreshes of the covariance estimate and the router's directions.
        warmup_steps: steps of each task before the router rewrite starts.
        mu: the curvature scaling's damping (absolute, the authors').
        mu_relative: ``mu`` times the mean of the snapshot's kept standard deviations instead.
        covariance: ``local`` (the authors': every ``refresh_every`` steps, a randomized estimate from
            that step's micro-batches, for the router and, the last one of a task, for the next task's
            curvature snapshot) or ``running`` (the paper: every refresh folded into a Frequent
            Directions sketch of the covariance over all tasks so far, for both).
        ema_decay: decay of the utilization / importance EMAs.
        mask_threshold: experts scoring below it are masked.
        stat_tokens: tokens per process a refresh estimates the covariance from (evenly spaced;
            ``null``: every token of the micro-batch, the authors').
        spectral_routing: the spectral-aware router rewrite (off: ablation).
        curvature_scaling: the curvature-aware rescaling of the experts' A gradients (off: ablation).
        adaptive_activation: the expert masks (off: ablation).
        routing_encoder: the frozen features the task prior compares (``backbone`` or ``clip``).
        prior: ``prototype`` (the authors' task prior at evaluation) or ``none``.
        prior_scale: the softmax scale of the prior over cosine scores (the authors' 28).
        prior_image_weight: the image cosine's share of a sample's score (the authors' 0.2).
        expert_init: ``normal`` (A ~ N(0, ``init_std``^2), the authors') or ``kaiming`` (PEFT's); B is zero.
        init_std: the standard deviation of ``expert_init: normal``.
        ema_init: ``uniform`` (utilization and importance start at 1/E, the authors') or ``first_batch``.
        train_tokens: ``all`` (every position of the micro-batch, the authors') or ``real`` (no padding):
            the tokens the training batch mean, the activation EMAs and the covariance see.
        masks_at_start: from the second task on, also apply the adaptive-activation rule once before the
            task's first step, so no step trains the experts it masks (``false``: after each step only,
            the authors' rule).
        route_by: ``router`` (the method: its router times its prior) or ``task_id`` (the oracle: the
            prior is the true task's, on the experts it trained).
    """

    name = "same"
    unused_parameters = True  # experts its masks close stay out of the forward: DDP must look for them
    in_task_refusal = ("its statistics between refreshes (the router's directions, the masks that have closed, the "
                       "step count) live outside its tensors, and an in-task checkpoint does not hold them")
    state_kind = "prior"  # stored parameters: what ``state()`` keeps to route

    def __init__(self, experts: ExpertSetup, *, num_experts: int = 4, delta: float = 0.9, max_directions: int = 64,
                 refresh_every: int = 20, warmup_steps: int = 10, mu: float = 0.9, mu_relative: bool = False,
                 covariance: str = "local", ema_decay: float = 0.95, mask_threshold: float = 0.1,
                 stat_tokens: int | None = 256, spectral_routing: bool = True, curvature_scaling: bool = True,
                 adaptive_activation: bool = True, routing_encoder: RoutingEncoder | None = None,
                 prior: str = "prototype", prior_scale: float = 28.0, prior_image_weight: float = 0.2,
                 expert_init: str = "normal", init_std: float = 0.01, ema_init: str = "uniform",
                 train_tokens: str = "all", route_by: str = "router", masks_at_start: bool = True) -> None:
        if experts.router is not None or experts.initial_experts:
            raise ValueError("same builds its own router and experts: leave experts.router and "
                             "experts.initial_experts unset")
        if num_experts < 2:
            raise ValueError(f"same: num_experts must be >= 2, got {num_experts}")
        if covariance not in ("local", "running"):
            raise ValueError(f"same: covariance must be 'local' or 'running', got {covariance!r}")
        if stat_tokens is not None and stat_tokens < 2:
            raise ValueError(f"same: stat_tokens must be >= 2 or null, got {stat_tokens}")
        if not 0 < delta <= 1 or max_directions < 1 or refresh_every < 1 or mu <= 0:
            raise ValueError("same: need 0 < delta <= 1, max_directions >= 1, refresh_every >= 1 and mu > 0")
        for key, value, allowed in (("prior", prior, ("prototype", "none")),
                                    ("expert_init", expert_init, ("normal", "kaiming")),
                                    ("ema_init", ema_init, ("uniform", "first_batch")),
                                    ("train_tokens", train_tokens, ("all", "real")),
                                    ("route_by", route_by, ("router", "task_id"))):
            if value not in allowed:
                raise ValueError(f"same: {key} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0 <= prior_image_weight <= 1 or prior_scale <= 0 or init_std <= 0:
            raise ValueError("same: need 0 <= prior_image_weight <= 1, prior_scale > 0 and init_std > 0")
        experts.router = BatchMeanRouter
        super().__init__(experts)
        self.num_experts, self.delta, self.max_directions = num_experts, delta, max_directions
        self.refresh_every, self.warmup_steps = refresh_every, warmup_steps
        self.mu, self.mu_relative, self.covariance = mu, mu_relative, covariance
        self.ema_decay, self.mask_threshold, self.stat_tokens = ema_decay, mask_threshold, stat_tokens
        self.spectral_routing, self.curvature_scaling = spectral_routing, curvature_scaling
        self.adaptive_activation = adaptive_activation
        self.routing_encoder = routing_encoder or RoutingEncoder()
        self.prior, self.prior_scale, self.prior_image_weight = prior, prior_scale, prior_image_weight
        self.expert_init, self.init_std = expert_init, init_std
        self.ema_init, self.train_tokens = ema_init, train_tokens
        self.route_by, self.masks_at_start = route_by, masks_at_start
        self.task, self.steps = 0, 0
        # Per seen task: sums and counts of its training samples' features (anchor = sum / count).
        self.anchors: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: dict[int, dict[str, torch.Tensor]] = {}  # this process, the task in training
        self._hits: dict[tuple[int, int], int] = {}  # (true task, the prior's top-1 task) -> samples
        self.drift = DriftMeter()  # what a task does to earlier experts
        self.drift_reports: dict[int, dict[str, Any]] = {}  # per finished task (kept in the method's state)

    # --------------------------------------------------------------- structure
    def build(self, model: nn.Module):
        report = super().build(model)
        for index, layer in enumerate(expert_layers(model).values()):
            stats = SAMEStatistics(layer.in_features, self.num_experts, self.max_directions,
                                   running=self.covariance == "running", seed=index)
            if self.ema_init == "uniform":  # importance starts at 1/E once and is carried across tasks
                stats.importance.fill_(1.0 / self.num_experts)
                stats.importance_seen.fill_(True)
            layer.add_module("same", stats.to(layer.base_layer.weight.device))
            layer.register_observer("same", partial(self.take_statistics, stats=stats))
            layer.register_gradient_transform(self.rewrite_gradients)
        if self.prior != "none":
            self.routing_encoder.bind(model, self.tokenizer)
        return report

    def callbacks(self) -> list:
        return [SAMEStatisticsCallback(self)]

    def on_task_start(self, model: nn.Module, task: int) -> None:
        if task == 0:
            for i in range(self.num_experts):
                self.add_expert_everywhere(model, f"e{i}")
            if self.expert_init == "normal":
                with torch.no_grad():
                    for layer in expert_layers(model).values():
                        for expert in layer.experts.values():
                            expert.A.normal_(0.0, self.init_std)
                            expert.B.zero_()
        self.task, self.steps = task, 0
        self._pending = {task: self._empty_sums(model)} if self.prior != "none" else {}
        for layer in expert_layers(model).values():
            stats = layer.same
            stats.utilization.fill_(1.0 / self.num_experts if self.ema_init == "uniform" else 0.0)
            stats.utilization_seen, stats.masks_final = self.ema_init == "uniform", False
            stats.router_directions = stats.router_sigma = stats.local = None
            stats.refreshed_at = -1
            layer.routers["default"].masked = set()
            layer.requires_grad_(True)
            layer.base_layer.requires_grad_(False)
        self.drift.begin(model, self.current_expert())
        if self.masks_at_start and self.adaptive_activation and task > 0:  # before the task's first step
            for name, layer in expert_layers(model).items():
                self._update_masks(layer, name)

    def current_expert(self) -> str:
        return f"e{min(self.task, self.num_experts - 1)}"

    def plan_task_end(self, model: nn.Module, task: int) -> None:
        """Without data: nothing (the task end's covariance snapshot adds no structure)."""

    def on_task_end(self, model: nn.Module, task: int) -> None:
        """Snapshot each layer's input covariance for the next task's expert scaling; the task's anchors."""
        for t, sums in sorted(self._pending.items()):  # every process's samples; zero while a resume replays
            sums = {k: all_reduce_sum(v) for k, v in sums.items()}
            if float(sums["text_count"]) > 0:
                total = self.anchors.setdefault(t, {k: torch.zeros_like(v) for k, v in sums.items()})
                for k, v in sums.items():
                    total[k] += v.to(total[k])
        self._pending = {}
        report = self.drift.report(model, self.mu, self.mu_relative, self.steps)  # under this task's snapshot
        if report is not None:  # (a replay trains nothing: the state's report stays)
            self.drift_reports[task] = report
        for layer in expert_layers(model).values():
            stats = layer.same
            directions, sigma = self._estimate(stats)
            if directions is not None:
                stats.set_snapshot(directions, sigma)
            layer.routers["default"].masked = set()

    # ------------------------------------------------------------------- steps
    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext | None:
        if training:
            if self.prior != "none":
                self._accumulate(batch["task_ids"], self.routing_encoder(batch))
            # Training routes on the micro-batch's tokens, the answer too, not only the prompt.
            mask = self._train_mask(batch["attention_mask"])
            context = RoutingContext(extra={"attention_mask": mask})
            context.cache[STAT_ROWS] = self.statistics_rows(mask)
            return context
        if self.route_by == "task_id":  # the oracle: the true task's prior; the prototype prior still scored
            if self.prior != "none" and self.anchors:
                seen = self.seen_tasks()
                self._count_hits(batch["task_ids"], self.task_prior(self.routing_encoder(batch), seen), seen)
            ids = batch["task_ids"]
            ids = torch.where((ids >= 0) & (ids <= self.task), ids, -1)  # trained tasks; the rest: none
            return RoutingContext(task_ids=ids, extra={"prior": self.oracle_prior(ids)})
        if self.prior == "none" or not self.anchors:
            return None
        seen = self.seen_tasks()
        prior = self.task_prior(self.routing_encoder(batch), seen)  # (B, T_seen)
        self._count_hits(batch["task_ids"], prior, seen)
        return RoutingContext(extra={"prior": self.expert_prior(prior, seen)})

    def _train_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(attention_mask) if self.train_tokens == "all" else attention_mask

    def statistics_rows(self, mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Flat row indices into a training forward's (B * L) tokens, the same for every layer: the real
        tokens (``None``: every position, ``train_tokens: all``) and at most ``stat_tokens`` evenly spaced
        of them, the covariance's rows. With ``train_tokens: real`` the number of real tokens is read back
        once here, per forward (the rows' count), instead of by every layer's statistics."""
        flat = mask.reshape(-1)
        real = None if self.train_tokens == "all" else flat.bool().nonzero().flatten()
        n = flat.numel() if real is None else real.numel()
        if self.stat_tokens is None or n <= self.stat_tokens:
            picked = torch.arange(n, device=flat.device) if real is None else real
        else:
            picked = torch.linspace(0, n - 1, self.stat_tokens, device=flat.device).long()
            picked = picked if real is None else real.index_select(0, picked)
        return real, picked

    # -------------------------------------------------------------- task prior
    def _empty_sums(self, model: nn.Module) -> dict[str, torch.Tensor]:
        enc, dev = self.routing_encoder, next(model.parameters()).device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
        return {"image_sum": zeros(enc.image_dim), "image_count": zeros(()), "text_sum": zeros(enc.text_dim),
                "text_count": zeros(())}

    @torch.no_grad()
    def _accumulate(self, task_ids: torch.Tensor, feats: RoutingFeatures) -> None:
        for t in task_ids.unique().tolist():
            rows = task_ids.to(feats.text.device) == t
            img = rows & feats.has_image
            add = {"image_sum": feats.image[img].double().sum(0), "image_count": img.sum().double(),
                   "text_sum": feats.text[rows].double().sum(0), "text_count": rows.sum().double()}
            pending = self._pending.setdefault(int(t), {k: torch.zeros_like(v) for k, v in add.items()})
            for k, v in add.items():
                pending[k] += v.to(pending[k].device)

    def seen_tasks(self) -> list[int]:
        return sorted(t for t, a in self.anchors.items() if float(a["text_count"]) > 0)

    @torch.no_grad()
    def task_prior(self, feats: RoutingFeatures, seen: list[int] | None = None) -> torch.Tensor:
        """(B, T_seen) softmax over the seen tasks (``seen_tasks()`` order) of the anchor scores."""
        seen = self.seen_tasks() if seen is None else seen
        dev = feats.text.device

        def anchor(t: int, kind: str) -> torch.Tensor:
            a = self.anchors[t]
            return (a[f"{kind}_sum"] / a[f"{kind}_count"].clamp(min=1)).to(dev, torch.float32)

        text = torch.stack([anchor(t, "text") for t in seen])  # (T, D)
        score = F.cosine_similarity(feats.text[:, None], text[None], dim=-1)  # (B, T)
        image = torch.stack([anchor(t, "image") for t in seen])
        cos_img = F.cosine_similarity(feats.image[:, None], image[None], dim=-1)
        w = self.prior_image_weight
        score = torch.where(feats.has_image[:, None], w * cos_img + (1 - w) * score, score)
        return torch.softmax(self.prior_scale * score, dim=-1)

    def task_experts(self, task: int, names: list[str]) -> list[str]:
        return [n for n in names if n == f"e{min(task, self.num_experts - 1)}"]

    def expert_prior(self, prior: torch.Tensor, seen: list[int] | None = None) -> torch.Tensor:
        """(B, E): a task's prior on its expert ``min(t, E - 1)`` (tasks past E share the last one)."""
        seen = self.seen_tasks() if seen is None else seen
        out = prior.new_zeros(prior.shape[0], self.num_experts)
        idx = index_on(prior.device, [min(t, self.num_experts - 1) for t in seen])
        return out.index_add(1, idx, prior)

    def oracle_prior(self, task_ids: torch.Tensor) -> torch.Tensor:
        """(B, E) the oracle's prior: uniform over the experts sample b's task trained (``task_experts``),
        zero for a general task (id -1) and for a task not trained yet (after ``self.task``)."""
        names = [f"e{i}" for i in range(self.num_experts)]
        rows = []
        for t in task_ids.tolist():  # once per batch
            own = [names.index(n) for n in self.task_experts(t, names)] if 0 <= t <= self.task else []
            rows.append([1.0 / len(own) if i in own else 0.0 for i in range(self.num_experts)])
        return torch.tensor(rows, dtype=torch.float32, device=task_ids.device).view(len(rows), self.num_experts)

    def _count_hits(self, task_ids: torch.Tensor, prior: torch.Tensor, seen: list[int] | None = None) -> None:
        seen = self.seen_tasks() if seen is None else seen
        chosen = [seen[i] for i in prior.argmax(-1).tolist()]
        for true, c in zip(task_ids.tolist(), chosen, strict=False):
            if true >= 0:  # a general task's sample has no true task to find
                self._hits[(true, c)] = self._hits.get((true, c), 0) + 1

    def stage_metrics(self, task_names: list[str]) -> dict[str, Any] | None:
        drift = self.drift_reports.get(self.task) if self.drift_reports else None  # the task just finished
        out = {"drift": drift} if drift is not None else {}
        prior = self._prior_metrics(task_names)
        return {**out, **prior} if out or prior else None

    def _prior_metrics(self, task_names: list[str]) -> dict[str, Any]:
        if self.prior == "none" or not self.anchors:
            return {}
        out = choice_metrics(self._hits, task_names, "prior")
        self._hits = {}
        return out

    # ------------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {f"anchor.{t}.{k}": v.cpu() for t, a in self.anchors.items() for k, v in a.items()}
        drift = {str(t): r for t, r in sorted(self.drift_reports.items())}
        return {"anchor_tasks": sorted(self.anchors), "drift": drift}, tensors

    def load_state(self, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        keys = ("image_sum", "image_count", "text_sum", "text_count")
        self.anchors = {int(t): {k: tensors[f"anchor.{t}.{k}"] for k in keys} for t in facts.get("anchor_tasks", [])}
        self.drift_reports = {int(t): r for t, r in facts.get("drift", {}).items()}

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
                new = router_rewrite(grad, dirs, stats.router_sigma.to(grad.dtype), kept=stats.router_kept)
                for n, g in zip(names, new, strict=False):
                    router.rows[n].grad = g.clone()
        k, mean_sigma = stats.snapshot()
        if self.curvature_scaling and k > 0:
            sigma = stats.snapshot_sigma[:k]
            mu = self.mu * mean_sigma if self.mu_relative else self.mu
            for expert in layer.experts.values():
                if expert.A.grad is not None:
                    g = expert.A.grad
                    expert.A.grad = expert_rewrite(g.float(), stats.snapshot_directions[:, :k], sigma, mu).to(g.dtype)

    def take_statistics(self, x: torch.Tensor, routing, context: RoutingContext | None, *,
                        stats: SAMEStatistics | None = None) -> dict | None:
        """A layer observer (``ExpertLayer.register_observer``), in the training forward (never in a
        checkpoint's recomputation): the activation sums (per expert: routing mass, mass times the
        token's squared norm; the token count), and on a refresh step (every ``refresh_every`` steps,
        the first micro-batch of the step) the covariance's new estimate from ``stat_tokens`` rows of
        this micro-batch (``refresh``). Nothing of the input is kept."""
        if routing is None or routing.probs is None or context is None or "attention_mask" not in context.extra:
            return None
        if STAT_ROWS not in context.cache:  # a context not made by ``routing_context``
            context.cache[STAT_ROWS] = self.statistics_rows(context.extra["attention_mask"])
        real, picked = context.cache[STAT_ROWS]  # index tensors on the device: nothing read back per layer
        tokens = x.reshape(-1, x.shape[-1])  # (B * L, d)
        if stats is not None and stats.refreshed_at != self.steps and self.steps % self.refresh_every == 0 \
                and (self.spectral_routing or self.curvature_scaling):
            self.refresh(stats, tokens.index_select(0, picked))
        probs = routing.probs.detach().reshape(-1, routing.probs.shape[-1])  # (B * L, E)
        if real is not None:
            tokens, probs = tokens.index_select(0, real), probs.index_select(0, real)  # (N, d), (N, E)
        return {"sums": activation_sums(tokens.double(), probs.double())}

    @torch.no_grad()
    def refresh(self, stats: SAMEStatistics, rows: torch.Tensor) -> None:
        """A new estimate of the layer's input covariance from ``rows`` (n, d) of every process
        (``range_finder``: one d x k all-reduce, no rows cross), in float32: ``local`` keeps it as it
        is, ``running`` folds it into the Frequent Directions sketch over all tasks (weighted by
        ``refresh_every``: the steps it stands for). The router's directions follow."""
        running = self.covariance == "running"
        seed = (stats.seed * 1_000_003 + self.task * 65_537 + self.steps) % (2 ** 62)
        directions, sigma, moments = range_finder(rows, self.max_directions, seed, centered=not running,
                                                  reduce=all_reduce_sum)
        if running:  # the rows' second moment along the directions, their sum and squares, refresh_every times
            weight = float(self.refresh_every)
            n = moments["count"]
            energy = sigma.square() * (n - 1).clamp(min=1) * weight
            stats.covariance.update(energy.sqrt()[:, None] * directions.T, count=n * weight,
                                    total=moments["total"] * weight, squares=moments["squares"] * weight)
        else:
            stats.local = (directions, sigma)
        stats.refreshed_at, stats.refreshes = self.steps, stats.refreshes + 1
        if self.spectral_routing:  # every direction, the kept ones marked: k stays on the device
            vecs, vals, trace = self._spectrum(stats)
            stats.router_kept = kept_mask(vals, trace, self.delta, self.max_directions, at_least_one=True)
            stats.router_directions, stats.router_sigma = vecs, vals.sqrt()

    def _spectrum(self, stats: SAMEStatistics):
        """(directions (d, K), variances (K,), the trace ``delta`` cuts against) of the current estimate:
        ``local``, the last refresh's, against the energy it captured (the authors' rule); ``running``,
        the sketch's, against the covariance's trace."""
        if self.covariance == "running":
            return stats.covariance.eig()
        vecs, sigma = stats.local
        return vecs, sigma.square(), sigma.square().sum()

    def _estimate(self, stats: SAMEStatistics):
        """The kept directions (d, k) and their standard deviations (k,) of the current estimate, the
        next task's snapshot (``_spectrum``, k by ``delta``); (None, None) before any estimate."""
        if self.covariance != "running" and stats.local is None:
            return None, None
        vecs, vals, trace = self._spectrum(stats)
        k = kept_directions(vals, trace, self.delta, self.max_directions)
        return (vecs[:, :k], vals[:k].sqrt()) if k else (None, None)

    @torch.no_grad()
    def observe(self, model: nn.Module) -> None:
        """After an optimizer step: the activation EMAs and masks, from the sums ``take_statistics``
        took in the step's forward (summed over processes: 2E + 1 numbers per layer)."""
        for name, layer in expert_layers(model).items():
            taken = layer.observed.get("same")
            if taken is not None:
                self._activation(layer, taken["sums"], name)
        self.steps += 1

    def _activation(self, layer: ExpertLayer, sums: torch.Tensor, name: str = "") -> None:
        stats = layer.same
        sums = all_reduce_sum(sums)  # every process's tokens
        E = (sums.shape[0] - 1) // 2
        n = sums[-1].clamp(min=1)
        u, f = sums[:E] / n, sums[E:2 * E] / n
        d = self.ema_decay
        stats.utilization.copy_(d * stats.utilization + (1 - d) * u if stats.utilization_seen else u)
        stats.importance.copy_(d * stats.importance + (1 - d) * f if bool(stats.importance_seen) else f)
        stats.utilization_seen = True
        stats.importance_seen.fill_(True)
        if self.adaptive_activation and not stats.masks_final:
            self._update_masks(layer, name)

    def _update_masks(self, layer: ExpertLayer, name: str) -> None:
        """The adaptive-activation rule: experts scoring ``minmax(u) - minmax(f)`` below ``mask_threshold``
        are masked (never the current task's); once every other expert is, the masks stay until the task ends."""
        stats, router = layer.same, layer.routers["default"]
        if stats.utilization.is_meta:  # a model without data (mllm-cl plan): nothing to mask by, all stay open
            return
        score = minmax(stats.utilization) - minmax(stats.importance)
        current = self.current_expert()
        router.masked = {n for n, s in zip(router.expert_names, score.tolist(), strict=False) if s < self.mask_threshold
                         and n != current}
        stats.masks_final = len(router.masked) == len(router.expert_names) - 1
        if stats.masks_final:
            self.drift.masks_closed(name, layer, self.steps)
