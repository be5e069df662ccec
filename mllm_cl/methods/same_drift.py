"""What a SAME task's training does to the experts of earlier tasks (a stage metric, ``drift``).

For every expert other than the task's own, summed over the adapted layers: the norm of the
change of its A and B over the task, split at the step each layer's masks closed (before /
after; a layer whose masks never closed counts as before), and its A's change split inside /
outside the previous task's snapshot subspace, the one the curvature rule damps inside; its
change relative to its norm at the task's start. Per task: the step at which each layer's masks
closed (median, last, layers never closed), and the rule's gradient scale inside the subspace
relative to outside, ``mu / (sigma + mu)`` averaged over the kept directions and the layers (1:
no damping; the authors' absolute ``mu`` against inputs of O(1) spread keeps it near 1).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from mllm_cl.experts import expert_layers


class DriftMeter:
    def __init__(self) -> None:
        self.start: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.closed: dict[str, tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}

    @torch.no_grad()
    def begin(self, model: nn.Module, own: str) -> None:
        """At a task's start: every other expert's A and B, copied."""
        self.closed = {}
        self.start = {(name, e): (layer.experts[e].A.detach().clone(), layer.experts[e].B.detach().clone())
                      for name, layer in expert_layers(model).items() for e in layer.expert_names if e != own}

    @torch.no_grad()
    def masks_closed(self, name: str, layer, step: int) -> None:
        """Layer ``name``'s masks closed at ``step``: its other experts as they are then."""
        if name not in self.closed:
            self.closed[name] = (step, {e: (layer.experts[e].A.detach().clone(), layer.experts[e].B.detach().clone())
                                        for n, e in self.start if n == name})

    @torch.no_grad()
    def report(self, model: nn.Module, mu: float, mu_relative: bool, steps: int) -> dict[str, Any] | None:
        """The task's drift (see the module docstring) after ``steps`` optimizer steps; ``None`` for none
        (a replay of a finished task trains nothing)."""
        if not steps:
            return None
        layers = expert_layers(model)
        closing = [self.closed[name][0] for name in layers if name in self.closed]
        out: dict[str, Any] = {"mask_close_step": {
            "median": statistics.median(closing) if closing else None, "last": max(closing) if closing else None,
            "never": sum(name not in self.closed for name in layers)}}
        if not self.start:
            return out
        sums: dict[str, dict[str, float]] = {}
        scales = []
        for name, layer in layers.items():
            stats = layer.same
            k, mean_sigma = stats.snapshot()
            u = stats.snapshot_directions[:, :k].float() if k else None
            if k:
                m = mu * mean_sigma if mu_relative else mu
                scales.append(float((m / (stats.snapshot_sigma[:k].float() + m)).mean()))
            for (layer_name, e), (a0, b0) in self.start.items():
                if layer_name != name:
                    continue
                a, b = layer.experts[e].A.detach(), layer.experts[e].B.detach()
                a_mid, b_mid = self.closed[name][1][e] if name in self.closed else (a, b)
                da = (a - a0).float()
                inside = da @ u if u is not None else da.new_zeros(da.shape[0], 0)
                acc = sums.setdefault(e, dict.fromkeys(("before", "after", "inside", "outside", "total", "start"), 0.0))
                acc["before"] += float((a_mid - a0).square().sum() + (b_mid - b0).square().sum())
                acc["after"] += float((a - a_mid).square().sum() + (b - b_mid).square().sum())
                acc["inside"] += float(inside.square().sum())
                acc["outside"] += float(da.square().sum() - inside.square().sum())
                acc["total"] += float(da.square().sum() + (b - b0).float().square().sum())
                acc["start"] += float(a0.square().sum() + b0.square().sum())
        root = lambda v: round(max(v, 0.0) ** 0.5, 6)  # noqa: E731
        out["experts"] = {e: {"update_before_close": root(s["before"]), "update_after_close": root(s["after"]),
                              "A_inside_snapshot": root(s["inside"]), "A_outside_snapshot": root(s["outside"]),
                              "relative": root(s["total"] / max(s["start"], 1e-30))} for e, s in sorted(sums.items())}
        out["inside_over_outside_scale"] = round(statistics.mean(scales), 6) if scales else None
        return out
