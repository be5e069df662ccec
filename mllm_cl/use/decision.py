"""The routing decision behind one prompt's answer: what the method chose and which experts got the weight.

``decisions(module, batch, context, task_names)`` runs one forward over the batch's prompts
with the routing context the method gave for its generation (so nothing is routed anew)
and records every expert layer's routing (``ExpertLayer.record``, as the routing diagnostic
``mllm_cl.report.routing`` does). Per sample it gives:

- ``choice``: the method's per-sample decision, read from that context: the task a
  locator chose (cmoe: ``router_choice`` ``taskN``), the instruction group (CRAM:
  ``groupN`` and the tasks in it), the task prior over the seen tasks (SAME), or the
  true task that was given (``individual``); ``None`` for methods without one.
- ``groups``: per layer group (a decoder block, ``layers.N``), the mean routing weight of
  every expert over the prompt's real tokens, averaged over the block's adapted modules;
  ``(none)`` is the mass routed to no adapter (a null expert, a general task's sample).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mllm_cl.experts import RoutingContext, expert_layers, routing_context

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")
NONE = "(none)"


def layer_group(name: str) -> str:
    """``...layers.3.self_attn.q_proj`` -> ``layers.3``; a name without a block index stays whole."""
    m = _BLOCK.search(name)
    return f"layers.{m.group(1)}" if m else name


def _choice(method, batch: dict[str, Any], context: RoutingContext | None, task_names: list[str]) -> list[str | None]:
    B = batch["input_ids"].shape[0]
    if context is None:
        return [None] * B

    def task(i: int) -> str:
        return task_names[i] if 0 <= i < len(task_names) else f"task {i}"

    if context.task_ids is not None:  # individual, and every oracle (route_by: task_id) but cmoe's
        return [f"the true task, as given: {task(int(t))}" if int(t) >= 0 else "no task (the base model alone)"
                for t in context.task_ids.tolist()]
    if context.router_choice is not None:
        out = []
        for name in context.router_choice:
            if m := re.fullmatch(r"task(\d+)", name):
                out.append(f"the task locator chose {task(int(m.group(1)))} (router {name})")
            elif m := re.fullmatch(r"group(\d+)", name):
                g = int(m.group(1))
                members = [task(t) for t, s in sorted(getattr(method, "slots", {}).items()) if s.get("group") == g]
                out.append(f"instruction group {g} (tasks {', '.join(members) or '?'}), then routed by the image "
                           f"centroids")
            else:
                out.append(f"router {name}")
        return out
    if "prior" in context.extra and hasattr(method, "task_prior"):
        prior = method.task_prior(method.routing_encoder(batch))  # (B, T_seen), no side effects
        seen = method.seen_tasks()
        return ["task prior " + ", ".join(f"{task(t)} {float(p):.2f}" for t, p in
                                          sorted(zip(seen, row.tolist(), strict=False), key=lambda tp: -tp[1]))
                for row in prior]
    return [None] * B


@torch.no_grad()
def decisions(module, batch: dict[str, Any], context: RoutingContext | None,
              task_names: list[str]) -> list[dict[str, Any]]:
    """Per sample of ``batch`` (on the model's device): ``{"choice", "tokens", "groups"}``."""
    model, method = module.model, module.method
    mask = batch["attention_mask"]
    ctx = context if context is not None else RoutingContext()
    ctx.token_mask = mask.long()  # whole-prompt routers pool over the prompt's real tokens, as at generation
    layers = expert_layers(model)
    for layer in layers.values():
        layer.record = []
    try:
        with routing_context(model, ctx):
            model(batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"],
                  position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0), **batch.get("model_inputs", {}))
        B, L = mask.shape
        real = mask.bool()
        sums: list[dict[str, dict[str, float]]] = [{} for _ in range(B)]  # group -> expert -> weight sum
        modules: list[dict[str, int]] = [{} for _ in range(B)]  # group -> adapted modules seen
        for name, layer in layers.items():
            group = layer_group(name)
            for rows, names, routing in layer.record:
                rows = list(range(B)) if rows is None else rows.tolist()
                if routing is None:
                    dense = torch.ones(len(rows), L, 1, device=mask.device)
                else:
                    dense = routing.dense(len(names)).float()
                    dense = dense.expand(len(rows) if dense.shape[0] == 1 else -1, L, -1)
                for i, b in enumerate(rows):
                    mean = dense[i][real[b]].mean(0)  # (E,) over the prompt's real tokens
                    acc = sums[b].setdefault(group, {})
                    for e, w in zip(names, mean.tolist(), strict=False):
                        acc[e] = acc.get(e, 0.0) + w
                    acc[NONE] = acc.get(NONE, 0.0) + max(0.0, 1.0 - float(mean.sum()))
                    modules[b][group] = modules[b].get(group, 0) + 1
    finally:
        for layer in layers.values():
            layer.record = None
        ctx.cache.clear()  # generation starts its own prefill
    choices = _choice(method, batch, context, task_names)
    out = []
    for b in range(B):
        groups = {g: dict(sorted(((e, w / modules[b][g]) for e, w in acc.items() if w > 5e-4),
                                 key=lambda ew: -ew[1]))
                  for g, acc in sums[b].items()}
        out.append({"choice": choices[b], "tokens": int(real[b].sum()), "groups": groups})
    return out


def describe(decision: dict[str, Any], *, top: int = 3) -> str:
    """Lines for the console: the method's choice, then the top experts per layer group."""
    lines = [f"  choice: {decision['choice'] or 'none (no per-sample choice; the layers route as below)'}"]
    if not decision["groups"]:
        lines.append("  no expert layers with experts: the base model answered")
        return "\n".join(lines)
    lines.append(f"  top experts per layer group, mean weight over the prompt's {decision['tokens']} tokens:")
    width = max(map(len, decision["groups"]))
    for group, weights in decision["groups"].items():
        best = list(weights.items())[:top]
        lines.append(f"    {group:<{width}}  " + "  ".join(f"{e} {w:.2f}" for e, w in best))
    return "\n".join(lines)
