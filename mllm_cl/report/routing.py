"""The routing diagnostic: where a stage's model sends each task's test prompts.

``mllm-cl report RUN --routing [--stage N]`` rebuilds the model of stage N from the run
directory (``mllm_cl.system.restore``), runs each seen task's first ``limit`` test prompts
followed by the answers the run predicted at that stage (``predictions/stage_NN``), routed
exactly as at evaluation, and records every expert layer's routing. Per task, per layer and
per token kind (``image``, ``instruction``: the prompt's text, ``answer``: the predicted
answer's tokens), it reports the share of tokens whose top-1 choice is one of the task's
own experts (``Method.task_experts``: the experts the task trained) and the mean routing
weight on them; for methods that choose per sample (a task locator, a task prior, a group)
the method's own choice accuracy and confusion matrix over the same prompts. For methods that
route every token over per-task experts, the separability diagnosis too (``separability``: the
separation ratio per layer, answer-token accuracy under four routings). Written to
``RUN/routing/stage_NN.json`` and ``RUN/plots/routing_stage_NN.png`` (a heatmap per kind).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from mllm_cl.data.collate import batch_to
from mllm_cl.experts import RoutingContext, expert_layers, routing_context
from mllm_cl.report.separability import markdown_lines as separability_lines
from mllm_cl.report.separability import measure as measure_separability

KINDS = ("image", "instruction", "answer")


def _extended(batch: dict[str, Any], answers: list[list[int]], pad_id: int) -> dict[str, Any]:
    """The left-padded prompt batch with each sample's answer tokens after its prompt, and the kind masks."""
    ids, mask, image = batch["input_ids"], batch["attention_mask"].bool(), batch["image_mask"]
    B, L = ids.shape
    width = L + max((len(a) for a in answers), default=0)
    out = torch.full((B, width), pad_id, dtype=ids.dtype, device=ids.device)
    att = torch.zeros(B, width, dtype=torch.bool, device=ids.device)
    kinds = {k: torch.zeros(B, width, dtype=torch.bool, device=ids.device) for k in KINDS}
    for b, answer in enumerate(answers):
        prompt = ids[b][mask[b]]
        n, a = prompt.numel(), len(answer)
        start = width - n - a  # left padding: every sequence ends at the last position
        out[b, start:start + n] = prompt
        out[b, start + n:] = torch.tensor(answer, dtype=ids.dtype, device=ids.device)
        att[b, start:] = True
        kinds["image"][b, start:start + n] = image[b][mask[b]]
        kinds["instruction"][b, start:start + n] = ~image[b][mask[b]]
        kinds["answer"][b, start + n:] = True
    return {"input_ids": out, "attention_mask": att.long(), "prompt_mask": att & ~kinds["answer"], **kinds}


def _accumulate(totals: dict, layer_name: str, record: list, tasks: torch.Tensor, kinds: dict, method) -> None:
    """Add one layer's routing of one batch to ``totals[(task, layer, kind)] = [tokens, own top-1, own weight]``."""
    B, L = kinds["image"].shape
    for rows, names, routing in record:
        rows = torch.arange(B, device=tasks.device) if rows is None else rows.to(tasks.device)
        if routing is None:  # a lone expert: weight 1 everywhere
            dense = torch.ones(len(rows), L, 1, device=tasks.device)
        else:
            dense = routing.dense(len(names)).float()
            dense = dense.expand(len(rows), L, dense.shape[-1]) if dense.shape[0] == 1 else dense.expand(-1, L, -1)
        null = (1 - dense.sum(-1)).clamp(min=0)  # mass routed to no adapter (a null expert)
        top = torch.where(dense.max(-1).values >= null, dense.argmax(-1), -1)  # (b, L), -1: the null expert
        for i, b in enumerate(rows.tolist()):
            task = int(tasks[b])
            own = [names.index(n) for n in method.task_experts(task, names)]
            if task < 0 or not own:
                continue
            own_t = torch.tensor(own, device=dense.device)
            is_own = (top[i][:, None] == own_t[None]).any(-1)  # (L,)
            weight = dense[i][:, own_t].sum(-1)  # (L,)
            for kind in KINDS:
                m = kinds[kind][b]
                if m.any():
                    acc = totals.setdefault((task, layer_name, kind), [0.0, 0.0, 0.0])
                    acc[0] += float(m.sum())
                    acc[1] += float(is_own[m].sum())
                    acc[2] += float(weight[m].sum())


@torch.no_grad()
def diagnose(restored, predictions: dict[str, dict[str, str]], *, limit: int = 50,
             separability: bool = True) -> dict[str, Any]:
    """``restored``: ``mllm_cl.system.restore.restore``'s model of a stage; ``predictions``: that
    stage's predicted answers (``load_predictions``); ``separability``: add the separability
    diagnosis (``separability.measure``) on the same tasks and test samples."""
    module, dm, stage = restored.module, restored.datamodule, restored.stage
    method, tokenizer = module.method, module.tokenizer
    layers = expert_layers(module.model)
    names = dm.task_names
    seen = range(len(names) if method.one_row else stage)
    device = next(module.model.parameters()).device
    totals: dict = {}
    method.stage_metrics(names)  # start from empty choice counters
    for t in seen:
        data = dm.test_dataset(t)
        subset = Subset(data, range(min(limit, len(data))))
        loader = DataLoader(subset, batch_size=dm.eval_batch_size, collate_fn=dm.eval_collate)
        predicted = predictions.get(names[t], {})
        for batch in loader:
            if batch.get("empty"):
                continue
            batch = batch_to(batch, device)
            answers = [tokenizer(predicted.get(r["question_id"], ""), add_special_tokens=False)["input_ids"]
                       for r in batch["records"]]
            ext = _extended(batch, answers, tokenizer.pad_token_id)
            context = method.routing_context(batch, training=False) or RoutingContext()
            context.token_mask = ext["prompt_mask"]  # whole-prompt routers pool over the prompt only
            positions = (ext["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            for layer in layers.values():
                layer.record = []
            try:
                with routing_context(module.model, context):
                    module.model(ext["input_ids"], attention_mask=ext["attention_mask"],
                                 pixel_values=batch["pixel_values"], position_ids=positions,
                                 **batch.get("model_inputs", {}))
                for name, layer in layers.items():
                    _accumulate(totals, name, layer.record, batch["task_ids"], ext, method)
            finally:
                for layer in layers.values():
                    layer.record = None
    choice = method.stage_metrics(names) or {}
    per = {}
    for (task, layer, kind), (n, own, weight) in sorted(totals.items()):
        per.setdefault(names[task], {}).setdefault(layer, {})[kind] = {
            "tokens": int(n), "own_top1": round(own / n, 4), "own_weight": round(weight / n, 4)}
    summary = {}
    for task, by_layer in per.items():
        for kind in KINDS:
            cells = [v[kind] for v in by_layer.values() if kind in v]
            if cells:
                n = sum(c["tokens"] for c in cells)
                summary.setdefault(task, {})[kind] = {
                    "own_top1": round(sum(c["own_top1"] * c["tokens"] for c in cells) / n, 4),
                    "own_weight": round(sum(c["own_weight"] * c["tokens"] for c in cells) / n, 4)}
    out = {"method": method.name, "stage": stage, "prompts_per_task": limit, "layers": list(layers),
           "summary": summary, "per_layer": per, "choice": {k: v for k, v in choice.items() if isinstance(v, dict)}}
    if separability:
        out.update(measure_separability(module, dm, list(seen), limit=limit))
    return out


def markdown(diag: dict[str, Any]) -> str:
    lines = [f"# Routing of {diag['method']} at stage {diag['stage']:02d} "
             f"(first {diag['prompts_per_task']} test prompts per task)", ""]
    if diag["summary"]:
        lines += ["Share of tokens whose top-1 expert is the task's own (mean weight on its own experts), "
                  "over every adapted layer:", "", "| task | " + " | ".join(KINDS) + " |",
                  "|---|" + "---|" * len(KINDS)]
        for task, by_kind in diag["summary"].items():
            lines.append(f"| {task} | " + " | ".join(
                f"{100 * by_kind[k]['own_top1']:.0f}% ({by_kind[k]['own_weight']:.2f})" if k in by_kind else "–"
                for k in KINDS) + " |")
    else:
        lines.append("This method has no task-owned experts (one shared adapter or a shared pool).")
    for key, value in diag["choice"].items():
        lines += ["", f"{key.replace('_', ' ')}: " + ", ".join(f"{t} {v}" for t, v in value.items())
                  if all(not isinstance(v, dict) for v in value.values()) else f"{key.replace('_', ' ')}: {value}"]
    lines += separability_lines(diag)
    return "\n".join(lines) + "\n"


def heatmap(diag: dict[str, Any], path: Path) -> Path | None:
    """Own-expert top-1 share per task (rows) and layer (columns), one panel per token kind."""
    if not diag["per_layer"]:
        return None
    import matplotlib  # heavy: for the figure only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: after the backend is chosen

    tasks, layers = list(diag["per_layer"]), diag["layers"]
    fig, axes = plt.subplots(len(KINDS), 1, figsize=(max(6, 0.35 * len(layers) + 2), 1.1 * len(tasks) * 3 + 1.5),
                             squeeze=False)
    for ax, kind in zip(axes[:, 0], KINDS, strict=False):
        grid = torch.full((len(tasks), len(layers)), float("nan"))
        for i, t in enumerate(tasks):
            for j, layer in enumerate(layers):
                cell = diag["per_layer"][t].get(layer, {}).get(kind)
                if cell:
                    grid[i, j] = cell["own_top1"]
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(tasks)), tasks)
        short = [name.replace("language_model.", "").replace("model.layers.", "") for name in layers]
        ax.set_xticks(range(len(layers)), short, rotation=90, fontsize=6)
        ax.set_title(f"{kind} tokens: share whose top-1 is the task's own expert")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_predictions(run_dir: Path, stage: int) -> dict[str, dict[str, str]]:
    """task -> question id -> predicted text, from ``predictions/stage_NN``."""
    folder = Path(run_dir) / "predictions" / f"stage_{stage:02d}"
    out = {}
    for f in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        out[f.stem] = {r["question_id"]: r["text"] for r in map(json.loads, f.read_text().splitlines()) if r}
    return out
