"""A run's experts as PEFT LoRA adapters, with ``routing.json`` saying how the method routes them.

    mllm-cl export RUN --out DIR [--stage N]

writes, for the model of stage N (default: the last, rebuilt by ``mllm_cl.system.restore``):

- ``DIR/NAME/`` for every expert ``NAME`` (``shared``, ``task0``, ``t1e0``, ...): a PEFT
  LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) over every adapted
  module that holds that expert, its rank and alpha per module (``rank_pattern`` /
  ``alpha_pattern`` where they differ), so that ``PeftModel.from_pretrained(base, DIR/NAME)``
  puts exactly that expert, alone, on the plain base;
- ``DIR/task_TASK/`` for every task the model has seen, where the method routes a task's
  samples by the task alone (``Method.fixed_routing``: ``lora_ft``, ``multitask``,
  ``individual``): one adapter that reproduces that task's outputs under true-task routing.
  A fixed mixture ``sum_i w_i s_i B_i A_i`` is itself one LoRA of rank ``sum_i r_i`` (the
  ``A_i`` stacked, the ``w_i s_i B_i`` side by side, alpha = rank so PEFT's scale is 1);
- ``DIR/routing.json``: the method, the base the adapters go on, every expert's modules and
  ranks, per task its experts (and the adapter, where one reproduces it), and how the
  method routes. Where routing depends on the sample or the token (a task locator, a task
  prior, instruction groups and centroids, gates, top-k), no per-task adapter is written:
  any fixed one would be an approximation; routing.json and the command say so.

The base is the plain transformers model: for the transformers MLLMs (Llava, Qwen2-VL, Qwen3-VL,
InternVL) the ``...ForConditionalGeneration`` itself, for a
composed backbone its language model (``ComposedMLLM.language_model``; the vision tower and
projector carry no experts). ``load_base(routing["base"])`` builds it from what the run
recorded (a tiny preset and seed, or the checkpoint path).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

HELP = "write a run's experts as PEFT LoRA adapters (one per expert; one per task where routing is fixed)"

#: How each method routes at evaluation, for routing.json (routers are not PEFT adapters: they stay in RUN).
HOW = {
    "zero_shot": "no adapters: the base model",
    "lora_ft": "one shared expert in every adapted module, for every task",
    "multitask": "one joint expert in every adapted module, for every task",
    "individual": "each sample by its true task to that task's expert (TaskRouter)",
    "moelora": "per token: a dense softmax router over every expert of the module",
    "routing": "per token: the top-k experts by standardized post-hoc gate scores, softmax over the kept",
    "cmoe": "per sample: a task locator (prompt features) picks one task's router; per token: that router's "
            "top-k over its experts",
    "same": "per sample: the router's softmax averaged over the prompt times a task prior from the prompt's image "
            "and instruction embeddings, top-k",
    "cram": "per sample: the instruction group (nearest prototype), then the group's centroid weights from the "
            "image embedding over its task slots",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="the run directory (holds config.yaml, results.json, checkpoints/)")
    p.add_argument("--out", required=True, help="the folder to write the adapters and routing.json into")
    p.add_argument("--stage", type=int, default=None, help="the model after this many tasks (default: the last)")


# ------------------------------------------------------------------------------------ the base
def peft_base(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(the plain model PEFT adapts, the prefix of its module names inside ``backbone``)."""
    if hasattr(backbone, "hf"):  # HFMLLM: the transformers MLLM itself
        return backbone.hf, "hf."
    if hasattr(backbone, "language_model"):  # ComposedMLLM: its causal LM
        return backbone.language_model, "language_model."
    raise TypeError(f"no PEFT base known for a {type(backbone).__name__} backbone")


def load_base(info: dict[str, Any]) -> nn.Module:
    """The plain base model (no expert layers) from routing.json's ``base`` (a run's backbone record)."""
    from mllm_cl.backbones.presets import build_backbone
    from mllm_cl.system.module import parse_dtype

    built = build_backbone(info.get("preset"), path=info.get("path"), seed=info.get("seed", 0),
                           dtype=parse_dtype(info.get("dtype"), "dtype"), image_size=info.get("image_size"))
    return peft_base(built.model)[0].eval()


# ---------------------------------------------------------------------------------- mixtures
def fixed_mixture(layer, task: int) -> dict[str, float] | None:
    """Task ``task``'s fixed expert weights in ``layer`` under true-task routing ({} = no expert: the
    base output), or ``None`` when the layer's routing depends on the input."""
    from mllm_cl.experts import FixedRouter, TaskRouter

    if not layer.experts:
        return {}
    router = layer._router(layer.active_router)
    if router is None:  # a lone expert, weight 1
        return {layer.expert_names[0]: 1.0}
    if isinstance(router, TaskRouter):
        name = router.task_experts.get(task)
        return {name: 1.0} if name in router.expert_names else {}
    if isinstance(router, FixedRouter):
        return {router.expert or router.expert_names[-1]: 1.0}
    return None


def _lora(layer, mixture: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (R, in), B (out, R)) with ``B A = sum_i w_i s_i B_i A_i``: PEFT's scale must be 1 (alpha = R)."""
    experts = [(layer.experts[n], w) for n, w in mixture.items()]
    A = torch.cat([e.A.detach() for e, _ in experts])
    B = torch.cat([e.B.detach() * (w * e.scale) for e, w in experts], dim=1)
    return A, B


# ---------------------------------------------------------------------------------- writing
def write_adapter(folder: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], *,
                  base_name: str | None) -> None:
    """A PEFT LoRA adapter: ``modules`` maps a module name of the base to (A (r, in), B (out, r), alpha)."""
    from peft import LoraConfig

    ranks = {n: a.shape[0] for n, (a, _, _) in modules.items()}
    alphas = {n: alpha for n, (_, _, alpha) in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the end of a module name: escaped full names match one module
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(modules), lora_dropout=0.0, bias="none",
                        rank_pattern={re.escape(n): k for n, k in ranks.items() if k != r},
                        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
                        base_model_name_or_path=base_name)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for n, (a, b, _) in modules.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{n}.lora_B.weight"] = b.contiguous().cpu()
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _routers(layers) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for layer in layers.values():
        for router in layer.routers.values():
            entry = out.setdefault(type(router).__name__, {"level": str(router.level), "routers": 0})
            entry["routers"] += 1
            if getattr(router, "top_k", None) is not None:
                entry["top_k"] = router.top_k
    return out


def export(restored, out: str | Path) -> dict[str, Any]:
    """Write the adapters of ``restored`` (``mllm_cl.system.restore``'s model) to ``out``; the routing.json."""
    from mllm_cl.experts import expert_layers

    module, dm, stage = restored.module, restored.datamodule, restored.stage
    method, out = module.method, Path(out)
    _, prefix = peft_base(module.model)
    layers = expert_layers(module.model)
    for name in layers:
        if not name.startswith(prefix):
            raise RuntimeError(f"expert layer {name} lies outside the PEFT base ({prefix.rstrip('.')}); "
                               "adapters there cannot be exported")
    local = {name: name[len(prefix):] for name in layers}
    info = dict(module.backbone_info)
    base_name = info.get("path") or info.get("preset")
    # every expert alone
    experts: dict[str, dict[str, tuple]] = {}
    for name, layer in layers.items():
        for e in layer.expert_names:
            x = layer.experts[e]
            experts.setdefault(e, {})[local[name]] = (x.A.detach(), x.B.detach(), x.alpha)
    for e, modules in experts.items():
        write_adapter(out / e, modules, base_name=base_name)
    # every seen task, where its routing is fixed
    names = dm.task_names
    seen = list(range(len(names) if method.one_row else stage))
    tasks: dict[str, Any] = {}
    fixed = method.fixed_routing and all(fixed_mixture(l, t) is not None for l in layers.values() for t in seen)
    for t in seen:
        if fixed:
            mixtures = {name: fixed_mixture(layer, t) for name, layer in layers.items()}
            modules = {}
            for name, mix in mixtures.items():
                if mix:
                    A, B = _lora(layers[name], mix)
                    modules[local[name]] = (A, B, float(A.shape[0]))
            used = sorted({e for mix in mixtures.values() for e in mix})
            weights = {e: sorted({mix[e] for mix in mixtures.values() if e in mix}) for e in used}
            entry = {"experts": {e: (w[0] if len(w) == 1 else w) for e, w in weights.items()},
                     "adapter": f"task_{names[t]}" if modules else None}
            if modules:
                write_adapter(out / f"task_{names[t]}", modules, base_name=base_name)
            tasks[names[t]] = entry
        else:
            pool = sorted({e for layer in layers.values() for e in layer.expert_names})
            tasks[names[t]] = {"trained_experts": sorted({e for layer in layers.values()
                                                          for e in method.task_experts(t, layer.expert_names)}),
                               "routed_over": pool, "adapter": None}
    routing = {
        "method": method.name, "stage": stage,
        "run": None if restored.run_dir is None else str(Path(restored.run_dir).resolve()),
        "base": {**info, "peft_base": ("the transformers model (HFMLLM.hf)" if prefix == "hf."
                                       else "the language model (ComposedMLLM.language_model)"),
                 "load": "mllm_cl.use.export.load_base(routing['base'])"},
        "routing": "fixed per task" if fixed else "depends on the sample or the token",
        "how": HOW.get(method.name, "routers: " + ", ".join(f"{k} ({v['level']} level)"
                                                            for k, v in _routers(layers).items())),
        "per_task_adapters": fixed,
        "note": None if fixed else ("no per-task adapter: this method's routing depends on the sample or the token, "
                                    "so any one fixed adapter would approximate it; each expert is exported alone "
                                    "and the routers (and any locator, prior or prototypes) stay in the run's "
                                    "checkpoints"),
        "routers": _routers(layers),
        "experts": {e: {"adapter": e, "modules": len(m), "ranks": dict(sorted(Counter(a.shape[0] for a, _, _ in
                                                                                   m.values()).items()))}
                    for e, m in sorted(experts.items())},
        "tasks": tasks,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(routing, indent=1) + "\n")
    return routing


def run(args: argparse.Namespace) -> int:
    from mllm_cl.system.restore import restore

    restored = restore(args.run, args.stage)
    routing = export(restored, args.out)
    out = Path(args.out)
    print(f"mllm-cl export: {routing['method']} at stage {routing['stage']:02d} -> {out}")
    for e, entry in routing["experts"].items():
        print(f"  {out / e}: expert {e} on {entry['modules']} modules (rank {', '.join(map(str, entry['ranks']))})")
    for task, entry in routing["tasks"].items():
        if entry["adapter"]:
            mix = " + ".join(f"{w} {e}" if w != 1.0 else e for e, w in entry["experts"].items())
            print(f"  {out / entry['adapter']}: task {task} exactly ({mix})")
    if routing["note"]:
        print(f"  routing: {routing['how']}")
        print(f"  {routing['note']}")
    print(f"  routing.json: {out / 'routing.json'}")
    return 0
