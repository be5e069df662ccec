"""CRAM: instruction groups, adaptive-rank experts, centroid routing, orthogonality penalty (arXiv 2606.02502).

Per task, in every adapted attention linear, a rank-48 ``buffer`` LoRA warms up (phase ``warmup``); the
task then joins or opens an instruction group, and the buffer is cut into the task's slot expert
``t{t}`` of adaptive rank (its significant directions that are new to the group's older slots),
which trains (phase ``stable``) under the group's ``CentroidRouter`` (per sample, by image feature)
with an orthogonality penalty against the older slots. At evaluation the instruction feature picks
the group, the image feature the slots. The parts are functions in ``mllm_cl.methods.cram_slots``.

Hooks: ``on_task_start`` (a fresh buffer), ``on_phase_start`` (the trainable set, the penalty's
bases), ``on_phase_end`` of the warm-up (group, slot, centroid), ``on_task_end`` (the group
prototype; the buffer dropped), ``routing_context`` (feature sums in training; the group choice, or
the oracle, at evaluation), ``extra_loss`` (the penalty), ``stage_metrics`` (group accuracy, slot ranks).

See docs/methods/cram.md: the algorithm, where it follows the authors' code and where it departs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.distributed import all_reduce_sum
from mllm_cl.experts import CentroidRouter, ExpertLayer, ExpertSetup, FixedRouter, RoutingContext, expert_layers
from mllm_cl.experts.routing import index_on
from mllm_cl.methods.base import ORACLE_ROUTER, Method, Phase, add_oracle_route, oracle_context
from mllm_cl.methods.cram_slots import (
    assign_group,
    instantiate_slot,
    novelty_threshold,
    orthogonality_penalty,
    penalty_basis,
    standardize,
)
from mllm_cl.methods.routing_encoder import RoutingEncoder

CHOICES = {"threshold": ("relative", "absolute"), "bandwidth": ("spread", "absolute"),
           "novelty_scaling": ("absolute", "dimension"), "eval_routing": ("sample", "batch"),
           "group_decision": ("first_batch", "warmup"), "penalty_basis": ("output", "authors"),
           "slot_scale": ("exact", "authors"), "route_by": ("centroids", "task_id", "task_slot")}


class CRAM(Method):
    """CRAM: adaptive-rank slot experts under instruction groups and centroid routing (docs/methods/cram.md).

    Args:
        experts: attention targets (q/k/v/o); ``rank`` is the buffer's rank.
        r_min: the smallest rank of a slot.
        r_max: the largest rank of a slot.
        warmup_share: the warm-up's share of the task's steps.
        join_cosine: with one group, a task joins it above this cosine to its prototype.
        margin: with two or more groups, a task joins the best when top1 - top2 exceeds it.
        max_groups: at this many groups, a task always joins the best.
        threshold: ``relative`` (sigma > ``relative`` x sigma_max) or ``absolute`` (> ``absolute``, the authors').
        relative: the relative significance threshold.
        absolute: the absolute significance threshold (the authors' 0.08).
        novelty: tau_novel, the share of a direction outside the group's older slots.
        novelty_scaling: ``absolute`` (tau as given) or ``dimension`` (tau scaled from ``novelty_ref_dim``).
        novelty_ref_dim: the width at which ``novelty`` holds under ``novelty_scaling: dimension``.
        fixed_rank: every slot takes the ``r_max`` largest directions (ablation).
        bandwidth: ``spread`` (sigma in units of the mean image spread of the group's slots) or ``absolute``
            (the authors').
        sigma: the centroid router's width (``null``: 0.5 under ``spread``, the authors' 2 under ``absolute``).
        orth_weight: lambda of the orthogonality penalty (0: off, ablation).
        penalty_basis: ``output`` (the older slots' output space, the paper's) or ``authors`` (their input
            row space for square modules).
        detach_gamma: stop the penalty's gradient through the routing mass (``false``: the authors').
        eval_routing: ``sample`` (each sample on its own) or ``batch`` (the authors': leaks task identity).
        group_decision: ``first_batch`` (the authors': the task's first micro-batch) or ``warmup``.
        slot_scale: ``exact`` or ``authors`` (a slot starts at twice the buffer's delta).
        routing_encoder: the frozen image and instruction features (``backbone`` or ``clip``).
        route_by: ``centroids`` (the method: the group prototypes, then the group's centroids),
            ``task_id`` (the oracle: each sample routed as its task's training routed it: its true group,
            the group's centroids over the slots that existed then) or ``task_slot`` (its task's slot
            alone, weight 1).
    """

    name = "cram"
    state_kind = "prototypes"  # stored parameters: what ``state()`` keeps to route

    def __init__(self, experts: ExpertSetup, *, r_min: int = 4, r_max: int = 9, warmup_share: float = 0.05,
                 join_cosine: float = 0.8, margin: float = 0.1, max_groups: int = 5, threshold: str = "relative",
                 relative: float = 0.1, absolute: float = 0.08, novelty: float = 0.99,
                 novelty_scaling: str = "absolute", novelty_ref_dim: int = 4096, fixed_rank: bool = False,
                 bandwidth: str = "spread", sigma: float | None = None, orth_weight: float = 1.0,
                 penalty_basis: str = "output", detach_gamma: bool = False, eval_routing: str = "sample",
                 group_decision: str = "first_batch", slot_scale: str = "exact",
                 routing_encoder: RoutingEncoder | None = None, route_by: str = "centroids") -> None:
        if experts.router is not None or experts.initial_experts:
            raise ValueError("cram builds its own buffer, slots and routers: leave experts.router and "
                             "experts.initial_experts unset")
        if not 1 <= r_min <= r_max:
            raise ValueError(f"cram: need 1 <= r_min <= r_max, got r_min {r_min}, r_max {r_max}")
        if not 0 < warmup_share < 1:
            raise ValueError(f"cram: warmup_share must be in (0, 1), got {warmup_share}")
        options = dict(threshold=threshold, bandwidth=bandwidth, novelty_scaling=novelty_scaling,
                       eval_routing=eval_routing, group_decision=group_decision, penalty_basis=penalty_basis,
                       slot_scale=slot_scale, route_by=route_by)
        for key, value in options.items():
            if value not in CHOICES[key]:
                raise ValueError(f"cram: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if sigma is not None and sigma <= 0:
            raise ValueError(f"cram: sigma must be > 0 or null, got {sigma}")
        super().__init__(experts)
        self.r_min, self.r_max, self.warmup_share = r_min, r_max, warmup_share
        self.join_cosine, self.margin, self.max_groups = join_cosine, margin, max_groups
        self.threshold, self.relative, self.absolute = threshold, relative, absolute
        self.novelty, self.novelty_scaling, self.novelty_ref_dim = novelty, novelty_scaling, novelty_ref_dim
        self.fixed_rank, self.bandwidth = fixed_rank, bandwidth
        self.sigma = sigma if sigma is not None else (0.5 if bandwidth == "spread" else 2.0)
        self.orth_weight, self.penalty_basis, self.detach_gamma = orth_weight, penalty_basis, detach_gamma
        self.eval_routing, self.group_decision, self.slot_scale = eval_routing, group_decision, slot_scale
        self.route_by = route_by
        self.routing_encoder = routing_encoder or RoutingEncoder()
        self.slots: dict[int, dict[str, Any]] = {}  # task -> {"group", "ranks": {layer: r}} (replayed on resume)
        self.prototypes: list[torch.Tensor] = []  # per group: running mean instruction feature
        self.prototype_counts: list[float] = []
        self._sums: dict[str, torch.Tensor] = {}  # the current task's feature sums (this process)
        self._phase = ""
        self._hits: dict[int, list[float]] = {}  # task -> [group right, samples, own-slot weight sum]
        self._chosen: dict[tuple[int, int], int] = {}  # (true task, chosen group) -> samples
        self._bases: dict[str, tuple] = {}  # layer -> (its older slots' state, the penalty's basis)
        self._model: nn.Module | None = None

    # --------------------------------------------------------------- structure
    def build(self, model: nn.Module):
        self._model = model
        report = super().build(model)
        self.routing_encoder.bind(model, self.tokenizer)
        for layer in expert_layers(model).values():
            layer.register_observer("image_mean", image_token_mean)  # the penalty's input: (B, d_in)
        return report

    def phases(self, task: int, num_tasks: int) -> list[Phase]:
        return [Phase("warmup", share=self.warmup_share), Phase("stable", share=1 - self.warmup_share)]

    def on_task_start(self, model: nn.Module, task: int) -> None:
        self._freeze(model)
        for layer in expert_layers(model).values():
            layer.add_expert("buffer", routers=[])  # fresh every task: A random, B zero
            layer.add_router("warmup", FixedRouter(layer.in_features, expert="buffer"), experts=["buffer"])
        if task in self.slots:  # resuming: the slots this task made, at their ranks
            self._add_slots(model, task, self.slots[task]["group"], self.slots[task]["ranks"])
        self._sums = {}

    def on_phase_start(self, model: nn.Module, task: int, phase: Phase) -> None:
        self._freeze(model)
        self._phase = phase.name
        for layer in expert_layers(model).values():
            if phase.name == "warmup":
                layer.active_router = "warmup"
                layer.experts["buffer"].requires_grad_(True)
            else:
                group = self.slots[task]["group"]
                layer.active_router = f"group{group}"
                layer.experts[f"t{task}"].requires_grad_(True)
                for p in layer.routers[f"group{group}"].expert_parameters(f"t{task}"):
                    p.requires_grad_(True)
        if phase.name != "warmup" and self.orth_weight:  # the penalty's bases, once for the phase
            for name, layer in expert_layers(model).items():  # (a model on the meta device has no values)
                if len(layer.routers[layer.active_router].expert_names) > 1 and not layer.base_layer.weight.is_meta:
                    self._older_basis(name, layer)

    def on_phase_end(self, model: nn.Module, task: int, phase: Phase) -> None:
        if phase.name != "warmup":
            return
        sums = {k: all_reduce_sum(v) for k, v in self._sums.items()}  # every process's warm-up batches
        if not sums:
            raise RuntimeError("cram: the warm-up saw no batch; it needs at least one step")
        key = "first" if self.group_decision == "first_batch" else "instruction"
        group = assign_group(self.prototypes, sums[key] / sums[f"{key}_count"], join_cosine=self.join_cosine,
                             margin=self.margin, max_groups=self.max_groups)
        if group is None:
            group = len(self.prototypes)
            self.prototypes.append(torch.zeros_like(sums["instruction"]))
            self.prototype_counts.append(0.0)
        n_img = sums["image_count"].clamp(min=1)
        centroid = sums["image"] / n_img
        spread = float(sums["image_sq"] / n_img - centroid.square().sum())
        spread = max(spread, 1e-6 * (float(centroid.square().sum()) + 1.0))  # identical images: no spread
        ref_dim = self.novelty_ref_dim if self.novelty_scaling == "dimension" else None
        ranks = {}
        for name, layer in expert_layers(model).items():
            older = [layer.experts[f"t{t}"].A for t, s in sorted(self.slots.items()) if s["group"] == group]
            tau = novelty_threshold(self.novelty, layer.in_features, ref_dim)
            buffer = layer.experts["buffer"]
            A, B = instantiate_slot(buffer.A.detach(), buffer.B.detach(), buffer.scale, older, r_min=self.r_min,
                                    r_max=self.r_max, threshold=self.threshold, relative=self.relative,
                                    absolute=self.absolute, novelty=tau, fixed_rank=self.fixed_rank,
                                    slot_scale=self.slot_scale)
            ranks[name] = A.shape[0]
            self._add_slots_layer(layer, task, group, A.shape[0], init=(A, B))
            router = layer.routers[f"group{group}"]
            router.set_centroid(f"t{task}", centroid)
            router.set_spread(f"t{task}", spread if self.bandwidth == "spread" else 1.0)
        self.slots[task] = {"group": group, "ranks": ranks}
        self._update_prototype(group, sums)

    def on_task_end(self, model: nn.Module, task: int) -> None:
        if task in self.slots and "instruction" in self._sums:
            self._update_prototype(self.slots[task]["group"], {k: all_reduce_sum(v) for k, v in self._sums.items()})
        self._sums = {}
        for layer in expert_layers(model).values():  # the buffer is for training only: not stored
            layer.remove_expert("buffer")
            del layer.routers["warmup"]
        self._freeze(model)

    def _add_slots(self, model: nn.Module, task: int, group: int, ranks: dict[str, int]) -> None:
        for name, layer in expert_layers(model).items():
            self._add_slots_layer(layer, task, group, ranks[name])

    def _add_slots_layer(self, layer: ExpertLayer, task: int, group: int, rank: int, init=None) -> None:
        name = f"group{group}"
        if name not in layer.routers:
            router = CentroidRouter(layer.in_features, embed_dim=self.routing_encoder.image_dim, sigma=self.sigma)
            layer.add_router(name, router)
        expert = layer.add_expert(f"t{task}", rank=rank, routers=[name])
        if self.route_by in ("task_id", "task_slot"):  # the TaskRouter: task_slot's route, no-task samples
            add_oracle_route(layer, task, f"t{task}")
        if init is not None:
            with torch.no_grad():
                expert.A.copy_(init[0])
                expert.B.copy_(init[1])

    def _update_prototype(self, group: int, sums: dict[str, torch.Tensor]) -> None:
        n_old, n_new = self.prototype_counts[group], float(sums["instruction_count"])
        mean = sums["instruction"] / max(n_new, 1.0)
        self.prototypes[group] = ((self.prototypes[group] * n_old + mean.to(self.prototypes[group]) * n_new)
                                  / (n_old + n_new))
        self.prototype_counts[group] = n_old + n_new
        for key in list(self._sums):
            if key not in ("first", "first_count"):
                self._sums[key] = torch.zeros_like(self._sums[key])

    @staticmethod
    def _freeze(model: nn.Module) -> None:
        for layer in expert_layers(model).values():
            layer.experts.requires_grad_(False)
            layer.routers.requires_grad_(False)

    # ------------------------------------------------------------------- steps
    @torch.no_grad()
    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features (B, D), instruction features (B, D'), has_image (B,)) as CRAM compares them."""
        feats = self.routing_encoder(batch)
        return feats.image, standardize(feats.text), feats.has_image

    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext | None:
        if self._model is None or (not training and not self.slots):
            return None  # before the first task: no slots to route to
        image, instruction, has = self.embed(batch)
        if training:
            self._accumulate(image, instruction, has)
            extra = {} if "image_mask" not in batch else {"image_mask": batch["image_mask"].to(image.device)}
            return RoutingContext(image_embeds=image, extra=extra)
        protos = torch.stack(self.prototypes).to(instruction)  # (G, D)
        if self.eval_routing == "batch":  # one group and one weight vector for the whole batch
            instruction = instruction.mean(0, keepdim=True).expand_as(instruction)
            image = (image[has].mean(0, keepdim=True) if bool(has.any()) else image[:1]).expand_as(image)
        groups = F.cosine_similarity(instruction[:, None], protos[None], dim=-1).argmax(-1).tolist()
        self._count(batch["task_ids"].tolist(), groups, image)
        if self.route_by == "task_slot":  # each sample to its own task's slot alone (groups still scored)
            return oracle_context(batch["task_ids"], self.slots)
        if self.route_by == "task_id":  # the oracle: as the sample's task trained (groups still scored)
            return self._as_trained(batch["task_ids"], image)
        return RoutingContext(image_embeds=image, router_choice=[f"group{g}" for g in groups])

    def _as_trained(self, task_ids: torch.Tensor, image: torch.Tensor) -> RoutingContext:
        """The oracle's context: a sample of trained task t goes to t's group router, limited to the
        group's slots up to t{t} (``visible_experts``: slots join their group's router in task order),
        with its own image feature: the routing task t's stable phase trained under. A sample with no
        trained task (a general task, a task after the stage) goes to the oracle's ``TaskRouter``,
        which gives it no slot."""
        ids = [t if t in self.slots else -1 for t in task_ids.tolist()]
        choice, visible = [], []
        for t in ids:
            group = self.slots[t]["group"] if t >= 0 else None
            choice.append(ORACLE_ROUTER if t < 0 else f"group{group}")
            visible.append(1 if t < 0 else sum(1 for u, s in self.slots.items() if s["group"] == group and u <= t))
        device = task_ids.device
        context = RoutingContext(task_ids=index_on(device, ids), image_embeds=image, router_choice=choice,
                                 extra={"visible_experts": index_on(device, visible)})
        context.host_lists.update(task_ids=ids, visible_experts=visible)  # the routers read these, not the device
        return context

    def _accumulate(self, image: torch.Tensor, instruction: torch.Tensor, has: torch.Tensor) -> None:
        img = image.double() * has.to(image.device, torch.float64)[:, None]  # the samples with an image (masked)
        add = {"instruction": instruction.double().sum(0),
               "instruction_count": instruction.new_full((), float(len(instruction)), dtype=torch.float64),
               "image": img.sum(0), "image_sq": img.square().sum(), "image_count": has.sum().double()}
        if "first" not in self._sums:  # the task's first micro-batch (per process; summed at warm-up end)
            add["first"], add["first_count"] = add["instruction"], add["instruction_count"]
        for k, v in add.items():
            self._sums[k] = self._sums.get(k, torch.zeros_like(v)) + v

    @torch.no_grad()
    def _count(self, tasks: list[int], groups: list[int], image: torch.Tensor) -> None:
        """Group accuracy, and the centroid weight on the sample's own slot (mean over the layers)."""
        task_group = {t: s["group"] for t, s in self.slots.items()}
        right = [task_group.get(t) == g for t, g in zip(tasks, groups, strict=False)]
        own = [0.0] * len(tasks)
        layers = list(expert_layers(self._model).values())
        for g in set(groups):
            rows = [b for b, (t, c) in enumerate(zip(tasks, groups, strict=False)) if c == g and right[b]]
            if not rows:
                continue
            picked = image.index_select(0, index_on(image.device, rows))
            weights, columns = [], {}
            for layer in layers:
                router = layer.routers[f"group{g}"]
                w = torch.softmax(router.logits(picked), -1)  # (n, E)
                cols = tuple(router.expert_names.index(f"t{tasks[b]}") for b in rows)
                if cols not in columns:
                    columns[cols] = index_on(w.device, cols)
                weights.append(w.gather(1, columns[cols][:, None])[:, 0])
            for per_layer in torch.stack(weights).tolist():  # one read-back for every layer
                for b, v in zip(rows, per_layer, strict=False):
                    own[b] += v / len(layers)
        for t, g, r, o in zip(tasks, groups, right, own, strict=False):
            if t < 0:  # a general task's sample: no true task to find
                continue
            hits = self._hits.setdefault(t, [0.0, 0.0, 0.0])
            hits[0] += float(r)
            hits[1] += 1
            hits[2] += o
            self._chosen[(t, g)] = self._chosen.get((t, g), 0) + 1

    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
        if self._phase != "stable" or not self.orth_weight:
            return None
        # The penalty's mean runs over the samples with an image, masked on the device (a batch without
        # any image gets a zero penalty): nothing is read back to the host per layer.
        keep = batch["image_mask"].to(batch["input_ids"].device).sum(1) > 0  # (B,)
        losses = []
        for name, layer in expert_layers(model).items():
            group_router = layer.routers[layer.active_router]
            slot = group_router.expert_names[-1]
            older = group_router.expert_names[:-1]
            h = layer.observed.get("image_mean")  # (B, d_in), taken in this step's forward
            if not older or h is None or layer.last_routing is None:
                continue
            gamma = 1 - layer.last_routing.weights.reshape(h.shape[0], -1)[:, -1]  # mass on older slots
            if self.detach_gamma:
                gamma = gamma.detach()
            e = layer.experts[slot]
            pairs = [(layer.experts[o].A, layer.experts[o].B) for o in older]
            losses.append(orthogonality_penalty(h, e.A, e.B, e.scale, pairs, gamma, basis_of=self.penalty_basis,
                                                q=self._older_basis(name, layer), rows=keep))
        return self.orth_weight * torch.stack(losses).mean() if losses else None

    def _older_basis(self, name: str, layer: ExpertLayer) -> torch.Tensor | None:
        """The penalty's basis of the older slots of ``layer``'s active group router (``penalty_basis``),
        kept while they are unchanged: they are frozen while a slot trains, so their SVD (whose kept rank
        is read back to the host) runs once per stable phase, at its start, not in every step."""
        router = layer.routers[layer.active_router]
        slot, older = router.expert_names[-1], router.expert_names[:-1]
        pairs = [(layer.experts[o].A, layer.experts[o].B) for o in older]
        key = (slot, tuple(older), self.penalty_basis,
               tuple((a.data_ptr(), a._version, b.data_ptr(), b._version) for a, b in pairs))
        cached = self._bases.get(name)
        if cached is None or cached[0] != key:
            e = layer.experts[slot]
            cached = self._bases[name] = (key, penalty_basis(pairs, square=e.A.shape[1] == e.B.shape[0],
                                                             basis_of=self.penalty_basis))
        return cached[1]

    # ------------------------------------------------------------ reporting
    def stage_metrics(self, task_names: list[str]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if self._hits:
            hits = torch.zeros(len(task_names), 3, dtype=torch.float64)
            for t, row in self._hits.items():
                hits[t] = torch.tensor(row, dtype=torch.float64)
            hits = all_reduce_sum(hits)  # every process scored its share of the test sets
            out["group_accuracy"] = {task_names[t]: round(100.0 * r / n, 2)
                                     for t, (r, n, _) in enumerate(hits.tolist()) if n}
            out["own_slot_weight"] = {task_names[t]: round(w / r, 4) for t, (r, n, w) in enumerate(hits.tolist()) if r}
            G = max(len(self.prototypes), 1)
            chosen = torch.zeros(len(task_names), G, dtype=torch.float64)
            for (t, g), n in self._chosen.items():
                chosen[t, g] += n
            chosen = all_reduce_sum(chosen)
            out["group_confusion"] = {task_names[t]: {f"group{g}": int(chosen[t, g]) for g in range(G) if chosen[t, g]}
                                      for t in range(len(task_names)) if chosen[t].any()}
        self._hits, self._chosen = {}, {}
        if self.slots:
            out["groups"] = {task_names[t]: s["group"] for t, s in sorted(self.slots.items())}
            out["slot_ranks"] = {task_names[t]: {"min": min(s["ranks"].values()), "max": max(s["ranks"].values()),
                                                 "mean": round(sum(s["ranks"].values()) / len(s["ranks"]), 2)}
                                 for t, s in sorted(self.slots.items())}
        return out or None

    # ------------------------------------------------------------------- state
    def task_progress(self) -> dict[str, torch.Tensor]:
        return {f"sums.{k}": v for k, v in self._sums.items()}

    def load_task_progress(self, tensors: dict[str, torch.Tensor]) -> None:
        self._sums = {k.removeprefix("sums."): v for k, v in tensors.items()}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        facts = {"slots": {str(t): s for t, s in self.slots.items()}, "prototype_counts": self.prototype_counts}
        return facts, {f"prototype.{g}": p.cpu() for g, p in enumerate(self.prototypes)}

    def load_state(self, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.slots = {int(t): {"group": s["group"], "ranks": dict(s["ranks"])}
                      for t, s in facts.get("slots", {}).items()}
        self.prototype_counts = list(facts.get("prototype_counts", []))
        self.prototypes = [tensors[f"prototype.{g}"] for g in range(len(self.prototype_counts))]


def image_token_mean(x: torch.Tensor, routing, context: RoutingContext | None) -> torch.Tensor | None:
    """An expert-layer observer: each sample's mean input over its image tokens, (B, d_in) (zero
    for a sample without an image), taken in the training forward (``ExpertLayer.register_observer``)."""
    if context is None or "image_mask" not in context.extra:
        return None
    mask = context.extra["image_mask"].to(x.dtype)  # (B, L)
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
