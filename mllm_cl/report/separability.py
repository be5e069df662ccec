"""Whether token-level routing can work on a run's data: the separability diagnosis.

For a method whose layers route every token over per-task experts (routing-based CL), on the held-out
slice (each seen task's first ``limit`` test samples), teacher-forced: the prompt followed by the
sample's reference answer as training encodes it (its first reference, with the end-of-answer token
the template adds).

- **Separation ratio**, per adapted module: its inputs ``x`` under the method's own routing,
  standardized per token as ``PostHocGateRouter`` does (zero mean, unit variance over features, no
  affine); with ``mu_t`` the mean of task ``t``'s tokens and ``mu`` the mean of the task means,
  ``between = sqrt(mean_t |mu_t - mu|^2)``, ``within = sqrt(mean_t mean_{x of t} |x - mu_t|^2)`` and
  the ratio ``between / within``, over the prompt's tokens (image and instruction), the answer's and
  all of them. Only sums are kept (per task: the sum of ``x``, of ``|x|^2`` and the count).
- **Answer-token accuracy** under four routings: the share of reference answer tokens whose argmax
  next-token prediction is right. ``gates``: the method's routing, as at evaluation; ``own``: every
  token to its sample's own task's experts (``Method.task_experts``; weight 1, split evenly over
  several); ``prompt_own``: the prompt's tokens own, the answer's by the method; ``answer_own``: the
  answer's tokens own, the prompt's by the method.

A ratio near 0 says the tasks' tokens look alike to a per-token router; ``own`` above ``gates`` is
what better routing could win with the same experts, and ``prompt_own`` / ``answer_own`` say where.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.data.collate import Skipped, batch_to
from mllm_cl.data.encoding import IGNORE
from mllm_cl.data.errors import BadSampleError
from mllm_cl.data.formats import Conversation
from mllm_cl.experts import ExpertLayer, Routing, RoutingContext, expert_layers, routing_context

ROUTINGS = ("gates", "own", "prompt_own", "answer_own")
SPANS = ("prompt", "answer", "all")
_OWN_MASK, _TASKS = "separability_own_mask", "separability_task_ids"  # keys of the routing context's extra


class Spread:
    """Per task: the sum of its token vectors, of their squared norms and their count (float64, on
    ``device``: adding a batch reads nothing back to the host)."""

    def __init__(self, tasks: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(tasks, dim, dtype=torch.float64, device=device)
        self.squares = torch.zeros(tasks, dtype=torch.float64, device=device)
        self.counts = torch.zeros(tasks, dtype=torch.float64, device=device)

    def add(self, task: int, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``x``: (..., dim) tokens of task ``task``; ``mask`` (x's leading shape): the ones to count."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        m = torch.ones(x.shape[0], device=x.device) if mask is None else mask.reshape(-1).to(x.device, x.dtype)
        self.sums[task] += (x * m[:, None]).sum(0).to(self.sums.device, torch.float64)
        self.squares[task] += (x.square().sum(-1) * m).sum().to(self.sums.device, torch.float64)
        self.counts[task] += m.sum().to(self.sums.device, torch.float64)

    def ratio(self) -> float | None:
        return separation_ratio(self.sums.cpu(), self.squares.cpu(), self.counts.cpu())


def separation_ratio(sums: torch.Tensor, squares: torch.Tensor, counts: torch.Tensor) -> float | None:
    """Between-task spread over within-task spread from per-task sums: ``sums`` (T, d) the sum of each
    task's token vectors, ``squares`` (T,) the sum of their squared norms, ``counts`` (T,) how many.
    Tasks without tokens are left out; ``None`` with fewer than two tasks or no spread within."""
    keep = counts > 0
    if int(keep.sum()) < 2:
        return None
    sums, squares, counts = sums[keep].double(), squares[keep].double(), counts[keep].double()
    means = sums / counts[:, None]  # (T, d) mu_t
    within = (squares / counts - means.square().sum(-1)).clamp(min=0).mean().sqrt()  # mean_t E|x - mu_t|^2
    between = (means - means.mean(0)).square().sum(-1).mean().sqrt()
    return float(between / within) if within > 0 else None


def own_weights(names: list[str], tasks: list[int], own_experts: Callable[[int, list[str]], list[str]],
                like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, E) weight 1 on each sample's own experts (split evenly over several) and (B,) whether it has any."""
    weights = like.new_zeros(len(tasks), len(names))
    for b, task in enumerate(tasks):
        own = [names.index(n) for n in own_experts(task, names)] if task >= 0 else []
        if own:
            weights[b, own] = 1.0 / len(own)
    return weights, weights.sum(-1) > 0


class _OwnWhere(nn.Module):
    """A router's routing, except that the tokens the context marks (``extra[_OWN_MASK]``, (B, L)) go
    to their sample's own experts with weight 1. Returns dense weights (``indices=None``)."""

    def __init__(self, router: nn.Module, own_experts: Callable[[int, list[str]], list[str]]) -> None:
        super().__init__()
        self.inner, self.own_experts = router, own_experts

    @property
    def expert_names(self) -> list[str]:
        return self.inner.expert_names

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        routing = self.inner(x, context)
        if context is None or _OWN_MASK not in context.extra:
            return routing
        mask = context.extra[_OWN_MASK]
        if mask.shape != x.shape[:-1]:  # not the language model's sequence: the method's routing
            return routing
        names = list(self.inner.expert_names)
        dense = routing.dense(len(names)).expand(*x.shape[:-1], len(names))  # null-expert mass dropped
        own, has_own = own_weights(names, context.host_list(_TASKS), self.own_experts, dense)
        where = (mask.to(dense.device) & has_own[:, None]).unsqueeze(-1)
        return Routing(weights=torch.where(where, own[:, None, :], dense), indices=None)


@contextlib.contextmanager
def own_routing(layers: dict[str, ExpertLayer], own_experts: Callable[[int, list[str]], list[str]]) -> Iterator[None]:
    """Every router of ``layers`` wrapped by ``_OwnWhere`` while the block runs, put back after."""
    saved = {name: dict(layer.routers.items()) for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            for key, router in saved[name].items():
                layer.routers[key] = _OwnWhere(router, own_experts)
        yield
    finally:
        for name, layer in layers.items():
            for key, router in saved[name].items():
                layer.routers[key] = router


def skip_reason(method, layers: dict[str, ExpertLayer], tasks: list[int], names: list[str],
                router_choice: list[str] | None = None) -> str | None:
    """Why the diagnosis does not apply (``None``: it does): it needs every layer routing per token and
    every task owning experts there. ``router_choice``: the routers the method's routing context names
    per sample (``RoutingContext.router_choice``), when it names any; else each layer's active router."""
    if not layers:
        return "the model has no expert layers"
    for layer in layers.values():
        for key in dict.fromkeys(router_choice or [layer.active_router]):
            router = layer.routers[key] if key in layer.routers else None
            if router is None or getattr(router, "level", "token") != "token":
                return "its routing is per sample or per batch, not per token"
            for t in tasks:
                if not method.task_experts(t, list(router.expert_names)):
                    return f"task {names[t]} has no expert of its own"
    return None


def _teacher_forced(data, indices: range, collate) -> tuple[dict[str, Any], dict[str, Any], list[int]] | None:
    """The samples ``indices`` of a test set as left-padded batches of prompt + reference answer (as training
    encodes it) and of the prompt alone, and each one's answer length; ``None`` when none is usable."""
    items, prompts, answers = [], [], []
    for i in indices:
        item = data[i]
        if isinstance(item, Skipped):
            continue
        rec = data.items[i]
        answer = rec.answer[0] if isinstance(rec.answer, (list, tuple)) and rec.answer else rec.answer
        if not isinstance(answer, str):
            continue
        turns = [("user", rec.prompt), ("assistant", answer)]
        try:
            enc = data.encoder.encode_conversation(Conversation(rec.question_id, rec.image, turns, rec.source))
        except BadSampleError:
            continue
        first = next((k for k, label in enumerate(enc.labels) if label != IGNORE), None)
        if first is None:
            continue
        items.append({**item, "input_ids": list(enc.input_ids)})
        prompts.append({**item, "input_ids": list(enc.input_ids[:first])})
        answers.append(len(enc.input_ids) - first)
    return (collate(items), collate(prompts), answers) if items else None


@torch.no_grad()
def measure(module, datamodule, tasks: list[int], *, limit: int = 50) -> dict[str, Any]:
    """The separation ratios and the four answer-token accuracies of ``module`` (a ``ContinualMLLM``)
    on tasks ``tasks`` of ``datamodule``: the keys ``separation`` ({layer: {span: ratio}}),
    ``answer_accuracy`` ({routing: {task: acc, "mean": acc}}), ``answer_tokens`` ({task: n}) and
    ``separability_note`` (why it was not measured, else ``None``)."""
    method, model = module.method, module.model
    layers = expert_layers(model)
    names = datamodule.task_names
    tasks = [t for t in tasks if t >= 0]  # a general task's samples have no expert of their own
    out: dict[str, Any] = {"separation": None, "answer_accuracy": None, "answer_tokens": None,
                           "separability_note": skip_reason(method, layers, tasks, names)}
    if out["separability_note"] is not None:
        return out
    device = next(model.parameters()).device
    spreads = {(name, span): Spread(len(names), layer.in_features, device)
               for name, layer in layers.items() for span in SPANS}
    correct = {r: dict.fromkeys(tasks, 0) for r in ROUTINGS}
    counted = dict.fromkeys(tasks, 0)
    spans: dict[str, torch.Tensor] = {}
    current = {"task": 0}

    def observe(name: str):
        def hook(layer, args):
            x = args[0]
            if x.shape[:-1] != spans["all"].shape:
                return
            x = F.layer_norm(x.float(), (x.shape[-1],))  # standardized per token, as the gate router does
            for span in SPANS:
                spreads[name, span].add(current["task"], x, spans[span])
        return hook

    for t in tasks:
        current["task"] = t
        data = datamodule.test_dataset(t)
        n = min(limit, len(data))
        for start in range(0, n, datamodule.eval_batch_size):
            built = _teacher_forced(data, range(start, min(n, start + datamodule.eval_batch_size)),
                                    datamodule.eval_collate)
            if built is None:
                continue
            batch, prompts, lengths = (batch_to(b, device) if isinstance(b, dict) else b for b in built)
            att = batch["attention_mask"].bool()
            W = att.shape[1]
            answer = torch.arange(W, device=device)[None, :] >= (W - torch.tensor(lengths, device=device))[:, None]
            spans.update(prompt=att & ~answer, answer=answer, all=att)
            keep = max(lengths) + 1  # the logits that predict the answer's tokens
            targets = batch["input_ids"][:, W - keep + 1:]  # (B, keep - 1)
            scored = answer[:, W - keep + 1:]
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            for routing in ROUTINGS:
                # from the prompt alone, as at evaluation (the reference answer must not steer a choice)
                context = method.routing_context(prompts, training=False) or RoutingContext()
                reason = skip_reason(method, layers, tasks, names, context.router_choice)
                if reason is not None:  # the context routes per sample (an oracle, a per-sample choice)
                    return {**out, "separability_note": reason}
                context.token_mask = spans["prompt"]  # whole-prompt routers pool over the prompt only
                own_mask = {"own": att, "prompt_own": spans["prompt"], "answer_own": answer}.get(routing)
                hooks = []
                with contextlib.ExitStack() as stack:
                    if own_mask is not None:
                        context.extra[_OWN_MASK], context.extra[_TASKS] = own_mask, batch["task_ids"]
                        context.host_lists[_TASKS] = batch["task_ids"].tolist()
                        stack.enter_context(own_routing(layers, method.task_experts))
                    else:  # the method's own routing: the layers' inputs for the ratios
                        hooks = [layer.register_forward_pre_hook(observe(name)) for name, layer in layers.items()]
                    stack.callback(lambda hooks=hooks: [h.remove() for h in hooks])
                    stack.enter_context(routing_context(model, context))
                    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                   pixel_values=batch["pixel_values"], position_ids=positions, use_cache=False,
                                   logits_to_keep=keep, **batch.get("model_inputs", {})).logits
                predicted = logits[:, -keep:-1].argmax(-1)  # (B, keep - 1): position p predicts token p + 1
                correct[routing][t] += int(((predicted == targets) & scored).sum())
            counted[t] += int(scored.sum())
    if not any(counted.values()):
        return {**out, "separability_note": "no test sample with a reference answer"}
    out["answer_tokens"] = {names[t]: counted[t] for t in tasks}
    accuracy = {}
    for r in ROUTINGS:
        per = {names[t]: correct[r][t] / counted[t] for t in tasks if counted[t]}
        per["mean"] = sum(per.values()) / len(per)
        accuracy[r] = {k: _rounded(v) for k, v in per.items()}
    out["answer_accuracy"] = accuracy
    out["separation"] = {name: {span: _rounded(spreads[name, span].ratio()) for span in SPANS} for name in layers}
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def markdown_lines(diag: dict[str, Any]) -> list[str]:
    """The diagnosis as markdown lines: the accuracies per task, the ratios over the layers."""
    lines = ["", "## Can token-level routing work here?", ""]
    if diag.get("separability_note"):
        return lines + [f"Not diagnosed: {diag['separability_note']}."]
    if diag.get("answer_accuracy") is None:
        return []
    acc = diag["answer_accuracy"]
    lines += ["Answer-token accuracy (%), teacher-forced on the reference answers, under four routings: `gates` the "
              "method's; `own` every token to its task's own expert; `prompt_own` the prompt's tokens own, the "
              "answer's by the gates; `answer_own` the answer's tokens own, the prompt's by the gates.", "",
              "| task | " + " | ".join(ROUTINGS) + " |", "|---|" + "---|" * len(ROUTINGS)]
    for task in acc["gates"]:
        lines.append(f"| {task} | " + " | ".join(
            "–" if acc[r].get(task) is None else f"{100 * acc[r][task]:.1f}" for r in ROUTINGS) + " |")
    ratios = diag.get("separation") or {}
    lines += ["", f"Separation ratio of each adapted module's standardized inputs (between-task spread of the task "
                  f"means / within-task spread), over {len(ratios)} modules (per module in the JSON):", ""]
    for span in SPANS:
        values = sorted(v[span] for v in ratios.values() if v.get(span) is not None)
        if values:
            lines.append(f"- {span} tokens: min {values[0]:.3f}, median {statistics.median(values):.3f}, "
                         f"max {values[-1]:.3f}")
        else:
            lines.append(f"- {span} tokens: – (needs two tasks or more)")
    return lines
