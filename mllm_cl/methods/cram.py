"""CRAM: instruction groups, adaptive-rank experts, centroid routing, orthogonality penalty
(methods.md, section 3).

Per adapted attention linear: a rank-48 ``buffer`` LoRA and one slot expert per
task (``t{t}``) whose rank is chosen per module. Per task:

- ``warmup`` (the first ``warmup_share`` of the task's steps): only the buffer
  trains (a ``FixedRouter``); the task's mean image embedding (its visual
  centroid) and mean instruction embedding are accumulated.
- between the phases: the task joins or opens an instruction group
  (``assign_group``); in every module the buffer's delta becomes the slot
  (``instantiate_slot``: significant singular directions, kept if novel with
  respect to the group's older slots, padded to ``r_min``, orthogonalized) and
  the slot joins the group's ``CentroidRouter``
  (``group{g}``) with its centroid set to the visual centroid.
- ``stable``: only the slot and its centroid train, routed per sample over the
  group's slots by image embedding, with the orthogonality penalty
  (``orthogonality_penalty``) on the group's older slots' output space.

The buffer is dropped at task end (it is not stored) and a fresh one is made at
the next task's start. At evaluation each sample picks its group by the cosine of its instruction
embedding to the group prototypes, then that group's centroid router.

The routing encoder **[choice]** is the model itself, frozen: an image is its
projected features mean-pooled (what the LLM reads, ``image_embeddings``), an
instruction the mean input embedding of the prompt's text tokens (the chat
template's fixed words included, the answer excluded); both standardized. A
separate CLIP encoder from a local path is not built. The significance
threshold is relative (``sigma >= 0.1 sigma_max``) by default; ``fixed_rank``
takes the ``r_max`` largest directions with no filter (the ablation row).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.distributed import all_reduce_sum
from mllm_cl.experts import CentroidRouter, ExpertLayer, ExpertSetup, FixedRouter, RoutingContext, expert_layers
from mllm_cl.methods.base import Method, Phase


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the features of each row (layer norm without affine)."""
    return F.layer_norm(x.float(), (x.shape[-1],))


def assign_group(prototypes: list[torch.Tensor], embedding: torch.Tensor, *, join_cosine: float = 0.8,
                 margin: float = 0.1, max_groups: int = 5) -> int | None:
    """The group a new task joins, or ``None`` for a new group (methods.md's rule)."""
    if not prototypes:
        return None
    cos = torch.stack([F.cosine_similarity(p, embedding, dim=0) for p in prototypes])
    if len(prototypes) == 1:
        return 0 if float(cos[0]) > join_cosine else None
    best = int(cos.argmax())
    if len(prototypes) >= max_groups:
        return best
    top = cos.topk(2).values
    return best if float(top[0] - top[1]) > margin else None


def _basis(columns: torch.Tensor | None, tol: float = 1e-6) -> torch.Tensor | None:
    """Orthonormal basis (d, m) of the span of ``columns`` (d, n), rank-revealing."""
    if columns is None or columns.shape[1] == 0:
        return None
    u, s, _ = torch.linalg.svd(columns, full_matrices=False)
    keep = s > tol * s.max().clamp(min=tol)
    return u[:, keep] if keep.any() else None


def instantiate_slot(buffer_A: torch.Tensor, buffer_B: torch.Tensor, scale: float, older_A: list[torch.Tensor], *,
                     r_min: int = 4, r_max: int = 9, threshold: str = "relative", relative: float = 0.1,
                     absolute: float = 0.08, novelty: float = 0.99, fixed_rank: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_e (r, d_in), B_e (d_out, r)) with ``2 B_e A_e = delta V V^T`` for the kept directions V.

    ``delta = scale B_buf A_buf``; its SVD through the QR of B. Candidates are the
    significant right-singular vectors (at most ``r_max``), kept when novel with
    respect to the row spaces of ``older_A`` (the group's older slots), padded to
    ``r_min`` with the next largest, then orthogonalized against those row spaces
    and among themselves. The slot's own scale is 2 (alpha = 2r at any rank).
    """
    A, B = buffer_A.double(), buffer_B.double()
    q, r = torch.linalg.qr(B)  # (d_out, R), (R, R)
    _, s, vh = torch.linalg.svd(scale * (r @ A), full_matrices=False)  # delta = q u s vh
    delta = scale * (B @ A)  # (d_out, d_in)
    qa = _basis(torch.cat([a.double() for a in older_A]).T) if older_A else None  # (d_in, m)
    order = list(range(s.numel()))
    if fixed_rank:
        kept = order[:r_max]
    else:
        limit = relative * s[0] if threshold == "relative" else absolute
        candidates = [i for i in order if s[i] >= limit][:r_max]

        def novel(i: int) -> bool:
            v = vh[i]
            rest = v if qa is None else v - qa @ (qa.T @ v)
            return float(rest.norm() / v.norm()) > novelty

        kept = [i for i in candidates if novel(i)] or order[:1]
        kept += [i for i in order if i not in kept][: max(0, r_min - len(kept))]
    v = vh[kept].T  # (d_in, r)
    if qa is not None:
        v = v - qa @ (qa.T @ v)
    v, _ = torch.linalg.qr(v)  # orthonormal, in the order of the kept directions
    slot_scale = 2.0
    return v.T.to(buffer_A.dtype), (delta @ v / slot_scale).to(buffer_B.dtype)


def orthogonality_penalty(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                          older_B: list[torch.Tensor], gamma: torch.Tensor) -> torch.Tensor:
    """``mean_b gamma_b ||Q_B^T z_b||^2`` with ``z_b = s B A h_b``; zero without older slots."""
    if not older_B:
        return h.new_zeros(())
    qb = _basis(torch.cat([b.detach().double() for b in older_B], dim=1))  # (d_out, m)
    if qb is None:
        return h.new_zeros(())
    z = scale * (h.to(A.dtype) @ A.T) @ B.T  # (n, d_out)
    return (gamma.to(z.dtype) * (z @ qb.to(z.dtype)).square().sum(-1)).mean()


class CRAM(Method):
    """Args:
        experts: attention targets (q/k/v/o); ``rank`` is the buffer's rank.
        r_min, r_max: bounds of a slot's rank.
        warmup_share: the warm-up's share of the task's steps.
        join_cosine, margin, max_groups: the group rule.
        threshold: ``relative`` (sigma >= ``relative`` x sigma_max) or ``absolute`` (>= ``absolute``).
        novelty: tau_novel, the share of a direction outside the group's older slots.
        fixed_rank: every slot takes the ``r_max`` largest directions (ablation).
        sigma: the centroid router's width on standardized embeddings.
        orth_weight: lambda of the orthogonality penalty (0: off, ablation).
    """

    name = "cram"

    def __init__(self, experts: ExpertSetup, *, r_min: int = 4, r_max: int = 9, warmup_share: float = 0.05,
                 join_cosine: float = 0.8, margin: float = 0.1, max_groups: int = 5, threshold: str = "relative",
                 relative: float = 0.1, absolute: float = 0.08, novelty: float = 0.99, fixed_rank: bool = False,
                 sigma: float = 0.5, orth_weight: float = 1.0) -> None:
        if experts.router is not None or experts.initial_experts:
            raise ValueError("cram builds its own buffer, slots and routers: leave experts.router and "
                             "experts.initial_experts unset")
        if not 1 <= r_min <= r_max:
            raise ValueError(f"cram: need 1 <= r_min <= r_max, got r_min {r_min}, r_max {r_max}")
        if threshold not in ("relative", "absolute"):
            raise ValueError(f"cram: threshold must be 'relative' or 'absolute', got {threshold!r}")
        if not 0 < warmup_share < 1:
            raise ValueError(f"cram: warmup_share must be in (0, 1), got {warmup_share}")
        super().__init__(experts)
        self.r_min, self.r_max, self.warmup_share = r_min, r_max, warmup_share
        self.join_cosine, self.margin, self.max_groups = join_cosine, margin, max_groups
        self.threshold, self.relative, self.absolute = threshold, relative, absolute
        self.novelty, self.fixed_rank, self.sigma, self.orth_weight = novelty, fixed_rank, sigma, orth_weight
        self.slots: dict[int, dict[str, Any]] = {}  # task -> {"group", "ranks": {layer: r}} (replayed on resume)
        self.prototypes: list[torch.Tensor] = []  # per group: running mean instruction embedding
        self.prototype_counts: list[float] = []
        self._sums: dict[str, torch.Tensor] = {}  # the current task's embedding sums
        self._phase = ""
        self._hits: dict[int, list[int]] = {}
        self._model: nn.Module | None = None

    # --------------------------------------------------------------- structure
    def build(self, model: nn.Module):
        self._model = model
        report = super().build(model)
        for layer in expert_layers(model).values():
            layer.keep_input = True  # the penalty reads each module's input at the image tokens
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

    def on_phase_end(self, model: nn.Module, task: int, phase: Phase) -> None:
        if phase.name != "warmup":
            return
        sums = {k: all_reduce_sum(v) for k, v in self._sums.items()}  # every process's warm-up batches
        if not sums:
            raise RuntimeError("cram: the warm-up saw no batch; it needs at least one step")
        instruction = sums["instruction"] / sums["count"]
        centroid = sums["image"] / sums["count_image"].clamp(min=1)
        group = assign_group(self.prototypes, instruction, join_cosine=self.join_cosine, margin=self.margin,
                             max_groups=self.max_groups)
        if group is None:
            group = len(self.prototypes)
            self.prototypes.append(torch.zeros_like(instruction))
            self.prototype_counts.append(0.0)
        ranks = {}
        for name, layer in expert_layers(model).items():
            older = [layer.experts[f"t{t}"].A for t, s in sorted(self.slots.items()) if s["group"] == group]
            buffer = layer.experts["buffer"]
            A, B = instantiate_slot(buffer.A.detach(), buffer.B.detach(), buffer.scale, older, r_min=self.r_min,
                                    r_max=self.r_max, threshold=self.threshold, relative=self.relative,
                                    absolute=self.absolute, novelty=self.novelty, fixed_rank=self.fixed_rank)
            ranks[name] = A.shape[0]
            self._add_slots_layer(layer, task, group, A.shape[0], init=(A, B))
            layer.routers[f"group{group}"].set_centroid(f"t{task}", centroid)
        self.slots[task] = {"group": group, "ranks": ranks}
        self._update_prototype(group, sums)

    def on_task_end(self, model: nn.Module, task: int) -> None:
        if task in self.slots and "instruction" in self._sums:
            stable = {k: v for k, v in self._sums.items()}
            self._update_prototype(self.slots[task]["group"], {k: all_reduce_sum(v) for k, v in stable.items()})
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
            embed = layer_input_embed_dim(self._model)
            layer.add_router(name, CentroidRouter(layer.in_features, embed_dim=embed, sigma=self.sigma))
        expert = layer.add_expert(f"t{task}", rank=rank, routers=[name])
        if init is not None:
            with torch.no_grad():
                expert.A.copy_(init[0])
                expert.B.copy_(init[1])

    def _update_prototype(self, group: int, sums: dict[str, torch.Tensor]) -> None:
        n_old, n_new = self.prototype_counts[group], float(sums["count"])
        mean = sums["instruction"] / max(n_new, 1.0)
        self.prototypes[group] = (self.prototypes[group] * n_old + mean.to(self.prototypes[group]) * n_new) / (n_old + n_new)
        self.prototype_counts[group] = n_old + n_new
        for key in list(self._sums):
            self._sums[key] = torch.zeros_like(self._sums[key])

    @staticmethod
    def _freeze(model: nn.Module) -> None:
        for layer in expert_layers(model).values():
            layer.experts.requires_grad_(False)
            layer.routers.requires_grad_(False)

    # ------------------------------------------------------------------- steps
    @torch.no_grad()
    def embed(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings (B, D), instruction embeddings (B, D), has_image (B,)), standardized."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        text = mask & ~batch["image_mask"]
        if batch.get("labels") is not None:
            text = text & (batch["labels"] == -100)
        tokens = model.get_input_embeddings()(ids).float()  # (B, L, D)
        instruction = (tokens * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
        has = batch["has_image"].to(ids.device)
        image = tokens.new_zeros(ids.shape[0], tokens.shape[-1])
        if batch.get("pixel_values") is not None:
            extra = {k: v for k, v in batch.get("model_inputs", {}).items() if k == "image_grid_thw"}
            image[has] = standardize(model.image_embeddings(batch["pixel_values"], **extra))
        return image, standardize(instruction), has

    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext | None:
        model = self._model
        if model is None or (not training and not self.slots):
            return None  # before the first task: no slots to route to
        image, instruction, has = self.embed(model, batch)
        if training:
            self._accumulate(image, instruction, has)
            return RoutingContext(image_embeds=image)
        protos = torch.stack(self.prototypes).to(instruction)  # (G, D)
        groups = F.cosine_similarity(instruction[:, None], protos[None], dim=-1).argmax(-1).tolist()
        task_group = {t: s["group"] for t, s in self.slots.items()}
        for true, g in zip(batch["task_ids"].tolist(), groups):
            hits = self._hits.setdefault(true, [0, 0])
            hits[0] += int(task_group.get(true) == g)
            hits[1] += 1
        return RoutingContext(image_embeds=image, router_choice=[f"group{g}" for g in groups])

    def _accumulate(self, image: torch.Tensor, instruction: torch.Tensor, has: torch.Tensor) -> None:
        add = {"instruction": instruction.double().sum(0), "count": instruction.new_tensor(float(len(instruction))).double(),
               "image": image[has].double().sum(0), "count_image": has.sum().double()}
        for k, v in add.items():
            self._sums[k] = self._sums.get(k, torch.zeros_like(v)) + v

    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
        if self._phase != "stable" or not self.orth_weight:
            return None
        image_mask = batch["image_mask"].to(batch["input_ids"].device)
        counts = image_mask.sum(1, keepdim=True)  # (B, 1)
        if not bool(counts.any()):
            return None
        losses = []
        for layer in expert_layers(model).values():
            group_router = layer.routers[layer.active_router]
            slot = group_router.expert_names[-1]
            older = group_router.expert_names[:-1]
            if not older or layer.last_input is None or layer.last_routing is None:
                continue
            h = (layer.last_input * image_mask[..., None]).sum(1) / counts.clamp(min=1)  # (B, d_in)
            keep = counts.flatten() > 0
            gamma = 1 - layer.last_routing.weights.reshape(h.shape[0], -1)[:, -1].detach()  # mass on older slots
            e = layer.experts[slot]
            losses.append(orthogonality_penalty(h[keep], e.A, e.B, e.scale,
                                                [layer.experts[o].B for o in older], gamma[keep]))
        return self.orth_weight * torch.stack(losses).mean() if losses else None

    # ------------------------------------------------------------ reporting
    def stage_metrics(self, task_names: list[str]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if self._hits:
            hits = torch.zeros(len(task_names), 2, dtype=torch.float64)
            for t, (right, total) in self._hits.items():
                hits[t] = torch.tensor([right, total], dtype=torch.float64)
            hits = all_reduce_sum(hits)
            out["group_accuracy"] = {task_names[t]: round(100.0 * r / n, 2) for t, (r, n) in enumerate(hits.tolist()) if n}
        self._hits = {}
        if self.slots:
            out["groups"] = {task_names[t]: s["group"] for t, s in sorted(self.slots.items())}
            out["slot_ranks"] = {task_names[t]: {"min": min(s["ranks"].values()), "max": max(s["ranks"].values()),
                                                 "mean": round(sum(s["ranks"].values()) / len(s["ranks"]), 2)}
                                 for t, s in sorted(self.slots.items())}
        return out or None

    # ------------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        facts = {"slots": {str(t): s for t, s in self.slots.items()}, "prototype_counts": self.prototype_counts}
        return facts, {f"prototype.{g}": p for g, p in enumerate(self.prototypes)}

    def load_state(self, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.slots = {int(t): {"group": s["group"], "ranks": dict(s["ranks"])} for t, s in facts.get("slots", {}).items()}
        self.prototype_counts = list(facts.get("prototype_counts", []))
        self.prototypes = [tensors[f"prototype.{g}"] for g in range(len(self.prototype_counts))]


def layer_input_embed_dim(model: nn.Module) -> int:
    """The routing encoder's dimension: the LLM's embedding width."""
    return model.get_input_embeddings().embedding_dim
