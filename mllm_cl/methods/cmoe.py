"""LLaVA-CMoE: probe-guided expert expansion and a probabilistic task locator (arXiv 2503.21227).

LoRA experts in the adapted linears (the FFN in ``configs/methods/cmoe.yaml``) under per-token top-k
routers with the Switch load-balancing loss; each task owns a router per layer over the layer's pool
as it stands at that task. Before a task trains, a probe decides which layers grow a new expert (a
copy of the layer's most-used one); after it, a locator is fitted on the frozen base's
last-prompt-token feature of the task's samples, and at evaluation it picks each sample's task, whose
routers the sample runs with.

Phases ``probe`` (tasks after the first) and ``train``. Hooks: ``on_task_start`` (freeze; the first
task grows every layer), ``on_phase_start`` (probe experts and router, or the task's trainable set),
``on_phase_end`` of the probe (the growth), ``extra_loss`` (balance loss), ``routing_context`` (the
located task's router, or the true one under ``route_by: task_id``), ``stage_metrics`` (the locator's
accuracy); the callbacks ``ProbeStatistics`` and ``TaskLocatorFitter`` (``mllm_cl.callbacks.cmoe``).

See docs/methods/cmoe.md: the algorithm, where it follows the paper and where it departs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.callbacks.cmoe import ProbeStatistics, TaskLocatorFitter
from mllm_cl.distributed import all_reduce_sum
from mllm_cl.experts import ExpertSetup, RoutingContext, TopKRouter, expert_layers
from mllm_cl.methods.base import Method, Phase, choice_metrics
from mllm_cl.methods.locator import GaussianLocator, TaskLocator, prompt_features, task_features


def balance_loss(probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load balancing ``E * sum_e f_e P_e`` over the real tokens.

    probs: (..., E) router probabilities; indices: (..., k) kept experts;
    mask: (...) real tokens. ``f_e``: share of the kept slots that go to expert
    e; ``P_e``: e's mean probability. Equal use gives 1.
    """
    E, k = probs.shape[-1], indices.shape[-1]
    m = torch.ones(probs.shape[:-1], device=probs.device) if mask is None else mask
    m = m.to(probs.dtype).reshape(-1)  # (N,)
    n = m.sum().clamp(min=1)
    P = (probs.reshape(-1, E) * m[:, None]).sum(0) / n  # (E,)
    idx = indices.reshape(-1, k)
    slots = F.one_hot(idx.clamp(min=0), E).to(probs.dtype) * (idx >= 0)[..., None].to(probs.dtype)  # (N, k, E)
    f = (slots.sum(1) * m[:, None]).sum(0) / (n * k)  # (E,)
    return E * (f.detach() * P).sum()


def layers_to_grow(frequencies: dict[str, float], alpha: float) -> list[str]:
    """Layers whose probe frequency is above ``mean - alpha * std`` over layers."""
    values = torch.tensor(list(frequencies.values()), dtype=torch.float64)
    threshold = values.mean() - alpha * values.std(unbiased=False)
    return [name for name, f in frequencies.items() if f > threshold]


class LLaVACMoE(Method):
    """LLaVA-CMoE: probe-guided expansion of per-task top-k routed experts, a task locator (docs/methods/cmoe.md).

    Args:
        experts: targets and expert rank (the routers and experts are added here).
        top_k: experts per token (k_eff = min(k, experts in the layer)).
        probe_experts: probe experts per layer in the probe phase.
        probe_fraction: share of the task's training data the probe trains on.
        probe_steps: a fixed probe length in steps (``null``: ``probe_share``; 0: no probe, every layer grows).
        probe_share: the probe's steps as a share of the task's budget (at least one).
        alpha: a layer grows if its probe frequency > mean - alpha x std over layers.
        new_experts: new experts per grown layer.
        balance_weight: weight of the Switch load-balancing loss (0: off).
        locator: ``gaussian`` (each task's mean and shrunk covariance) or ``vae`` (the paper's PTL).
        vae_hidden: the VAE's hidden width (``null``: sized from the feature width).
        vae_latent: the VAE's latent width (``null``: sized from the feature width).
        vae_steps: full-batch Adam steps per task's VAE.
        vae_lr: the VAE's learning rate.
        vae_beta: the KL's weight in the VAE's ELBO.
        shrinkage: the Gaussian locator's shrinkage of the covariance towards tr(C)/d I.
        route_by: ``locator`` (the method) or ``task_id`` (the oracle: the true task's router; the locator
            is still fitted and scored).
    """

    name = "cmoe"
    state_kind = "locator"  # stored parameters: what ``state()`` keeps to route

    def __init__(self, experts: ExpertSetup, *, top_k: int = 2, probe_experts: int = 1, probe_fraction: float = 0.1,
                 probe_steps: int | None = None, probe_share: float = 0.1, alpha: float = 1.0, new_experts: int = 1,
                 balance_weight: float = 0.01,
                 locator: str = "gaussian", vae_hidden: int | None = None, vae_latent: int | None = None,
                 vae_steps: int = 300, vae_lr: float = 1e-3, vae_beta: float = 1.0, shrinkage: float = 0.01,
                 route_by: str = "locator") -> None:
        if experts.router is not None or experts.initial_experts:
            raise ValueError("cmoe adds its own experts and per-task routers: leave experts.router and "
                             "experts.initial_experts unset")
        for name, value in (("top_k", top_k), ("probe_experts", probe_experts), ("new_experts", new_experts)):
            if value < 1:
                raise ValueError(f"cmoe: {name} must be >= 1, got {value}")
        if not 0 < probe_fraction <= 1 or not 0 < probe_share <= 1:
            raise ValueError(f"cmoe: probe_fraction and probe_share must be in (0, 1], "
                             f"got {probe_fraction} and {probe_share}")
        if probe_steps is not None and probe_steps < 0:
            raise ValueError(f"cmoe: probe_steps must be >= 0 or null (null: probe_share of the task's steps), "
                             f"got {probe_steps}")
        if route_by not in ("locator", "task_id"):
            raise ValueError(f"cmoe: route_by must be 'locator' or 'task_id', got {route_by!r}")
        if locator not in ("vae", "gaussian"):
            raise ValueError(f"cmoe: locator must be 'vae' or 'gaussian', got {locator!r}")
        super().__init__(experts)
        self.route_by = route_by
        self.top_k, self.probe_experts = top_k, probe_experts
        self.probe_fraction, self.probe_steps, self.probe_share = probe_fraction, probe_steps, probe_share
        self.alpha, self.new_experts, self.balance_weight = alpha, new_experts, balance_weight
        self.locator = (TaskLocator(hidden=vae_hidden, latent=vae_latent, steps=vae_steps, lr=vae_lr, beta=vae_beta)
                        if locator == "vae" else GaussianLocator(shrinkage=shrinkage))
        self.grown: dict[int, list[str]] = {}  # task -> layers that grew (replayed on resume)
        self.frequencies: dict[int, dict[str, float]] = {}  # task -> probe frequency per layer
        self.probe_counts: dict[str, torch.Tensor] = {}
        self.probing = False
        self._hits: dict[tuple[int, int], int] = {}  # (true task, located task) -> samples
        self._model: nn.Module | None = None

    # --------------------------------------------------------------- structure
    def build(self, model: nn.Module):
        self._model = model
        return super().build(model)

    def callbacks(self) -> list:
        return [ProbeStatistics(self), TaskLocatorFitter(self)]

    @property
    def probes(self) -> bool:
        """Whether tasks after the first probe before they grow (``probe_steps: 0`` grows every layer)."""
        return self.probe_steps != 0

    def phases(self, task: int, num_tasks: int) -> list[Phase]:
        train = [Phase("train")]
        if task == 0 or not self.probes:
            return train
        if self.probe_steps is not None:
            return [Phase("probe", steps=self.probe_steps, fraction=self.probe_fraction)] + train
        return [Phase("probe", share=self.probe_share, fraction=self.probe_fraction)] + train

    def _freeze(self, model: nn.Module) -> None:
        for layer in expert_layers(model).values():
            layer.experts.requires_grad_(False)
            layer.routers.requires_grad_(False)

    def _grow(self, model: nn.Module, task: int, layers: list[str], sources: dict[str, str] | None = None) -> None:
        """New experts in ``layers`` (copies of ``sources[layer]`` when given) and the task's routers everywhere."""
        for name, layer in expert_layers(model).items():
            if name in layers:
                for j in range(self.new_experts):
                    source = (sources or {}).get(name)
                    layer.add_expert(f"t{task}e{j}", init_from=source, routers=[])
            layer.add_router(f"task{task}", TopKRouter(layer.in_features, top_k=self.top_k), experts=layer.expert_names)
            layer.active_router = f"task{task}"
        self.grown[task] = sorted(layers)

    def on_task_start(self, model: nn.Module, task: int) -> None:
        self._freeze(model)
        if task in self.grown:  # resuming: replay the recorded growth
            self._grow(model, task, self.grown[task])
        elif task == 0 or not self.probes:
            self._grow(model, task, list(expert_layers(model)))

    def on_phase_start(self, model: nn.Module, task: int, phase: Phase) -> None:
        self._freeze(model)
        layers = expert_layers(model)
        if phase.name == "probe":
            for layer in layers.values():
                for j in range(self.probe_experts):
                    layer.add_expert(f"probe{j}", routers=[])
                layer.add_router("probe", TopKRouter(layer.in_features, top_k=self.top_k), experts=layer.expert_names)
                layer.active_router = "probe"
                for j in range(self.probe_experts):
                    layer.experts[f"probe{j}"].requires_grad_(True)
                layer.routers["probe"].requires_grad_(True)
            self.probe_counts, self.probing = {}, True
            return
        for layer in layers.values():
            layer.active_router = f"task{task}"
            layer.routers[f"task{task}"].requires_grad_(True)
            for name in layer.expert_names:
                if name.startswith(f"t{task}e"):
                    layer.experts[name].requires_grad_(True)

    def observe_probe_batch(self, model: nn.Module, batch: dict[str, Any]) -> None:
        """Add, per layer, the routing weight each expert of the probe router won in the
        kept top-k slots of real tokens."""
        mask = batch["attention_mask"].bool()
        for name, layer in expert_layers(model).items():
            routing = layer.last_routing
            if routing is None or routing.indices is None:
                continue
            idx, w = routing.indices[mask], routing.weights[mask].detach().float()  # (tokens, k)
            keep = idx >= 0
            mass = torch.zeros(layer.routers["probe"].num_experts, device=w.device).index_add_(0, idx[keep], w[keep])
            self.probe_counts[name] = self.probe_counts.get(name, 0) + mass  # on device: no sync per step

    def plan_phase_end(self, model: nn.Module, task: int, phase: Phase) -> None:
        """Without data: the probe experts and router go; the growth is the one already recorded."""
        if phase.name != "probe":
            return
        self.probing = False
        for layer in expert_layers(model).values():
            for j in range(self.probe_experts):
                layer.remove_expert(f"probe{j}")
            del layer.routers["probe"]

    def on_phase_end(self, model: nn.Module, task: int, phase: Phase) -> None:
        if phase.name != "probe":
            return
        self.probing = False
        frequencies, sources = {}, {}
        for name, layer in expert_layers(model).items():
            names = layer.routers["probe"].expert_names
            counts = self.probe_counts.get(name)
            if counts is None:
                raise RuntimeError(f"cmoe: no probe statistics for {name}; is "
                                   "mllm_cl.callbacks.cmoe.ProbeStatistics among the trainer's callbacks?")
            probe = [i for i, n in enumerate(names) if n.startswith("probe")]
            old = [i for i, n in enumerate(names) if not n.startswith("probe")]
            counts = all_reduce_sum(counts).cpu()  # every rank's probe batches; once per layer, at phase end
            frequencies[name] = float(counts[probe].sum() / counts.sum().clamp(min=1))
            sources[name] = names[max(old, key=lambda i: counts[i].item())]
            for j in range(self.probe_experts):
                layer.remove_expert(f"probe{j}")
            del layer.routers["probe"]
        self.frequencies[task] = frequencies
        self._grow(model, task, layers_to_grow(frequencies, self.alpha), sources)

    def on_task_end(self, model: nn.Module, task: int) -> None:
        self._freeze(model)

    def fit_locator(self, module, task: int) -> None:
        """The task's locator, fitted on the frozen base's features of the task's training samples
        (``task_features``: each process computes its share). ``module``: the ContinualMLLM."""
        feats, index = task_features(module, task)
        self.locator.fit_task(feats, index, seed=module.sequence.task_seed(task))

    # ------------------------------------------------------------------- steps
    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
        if not self.balance_weight:
            return None
        losses = [balance_loss(layer.last_routing.probs, layer.last_routing.indices, batch["attention_mask"])
                  for layer in expert_layers(model).values()
                  if layer.last_routing is not None and layer.last_routing.probs is not None]
        return self.balance_weight * torch.stack(losses).mean() if losses else None

    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext | None:
        if training or self.locator.num_tasks == 0:
            return None  # training: the phase's active router; before any task: no experts
        chosen = self.locator.choose(prompt_features(self._model, batch)).tolist()
        true_ids = batch["task_ids"].tolist()
        chosen_by_locator = chosen
        if self.route_by == "task_id":  # the oracle: what the experts can do with a perfect locator
            # a general task's sample (id -1) has no true task: it keeps the locator's choice
            chosen = [t if t >= 0 else c for t, c in zip(true_ids, chosen, strict=False)]
        for true, pred in zip(true_ids, chosen_by_locator, strict=False):
            if true >= 0:
                self._hits[(true, pred)] = self._hits.get((true, pred), 0) + 1
        return RoutingContext(router_choice=[f"task{c}" for c in chosen])

    def stage_metrics(self, task_names: list[str]) -> dict[str, Any] | None:
        out = choice_metrics(self._hits, task_names, "locator", samples=True)
        self._hits = {}
        return out or None

    # ------------------------------------------------------------------- state
    def task_progress(self) -> dict[str, torch.Tensor]:
        return {f"probe_counts.{name}": counts for name, counts in self.probe_counts.items()}

    def load_task_progress(self, tensors: dict[str, torch.Tensor]) -> None:
        self.probe_counts = {k.removeprefix("probe_counts."): v for k, v in tensors.items()}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        dim = self.locator.feature_dim if self.locator.num_tasks else 0
        facts = {"grown": {str(t): layers for t, layers in self.grown.items()},
                 "probe_frequencies": {str(t): f for t, f in self.frequencies.items()},
                 "locator_tasks": self.locator.num_tasks, "feature_dim": dim}
        return facts, {f"locator.{k}": v for k, v in self.locator.state_dict().items()}

    def load_state(self, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.grown = {int(t): list(layers) for t, layers in facts.get("grown", {}).items()}
        self.frequencies = {int(t): dict(f) for t, f in facts.get("probe_frequencies", {}).items()}
        if facts.get("locator_tasks"):
            self.locator.grow_to(facts["locator_tasks"], facts["feature_dim"])
            self.locator.load_state_dict({k.removeprefix("locator."): v for k, v in tensors.items()})
