"""A run's experts as PEFT LoRA adapters, with ``routing.json`` saying how the method routes them.

    mllm-cl export RUN --out DIR [--stage N]

writes, for the model of stage N (default: the last, rebuilt by ``mllm_cl.system.restore``),
each adapter once:

- every expert ``NAME`` (``shared``, ``task0``, ``t1e0``, ...) as a PEFT LoRA adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``) in ``DIR/NAME/`` over every adapted
  module that holds it, its rank and alpha per module (``rank_pattern`` / ``alpha_pattern``
  where they differ). An export of one expert (``lora_ft``, ``multitask``) is one adapter, in
  ``DIR`` itself, as PEFT saves a lone adapter;
- where the method routes a task's samples by the task alone (``Method.fixed_routing``:
  ``lora_ft``, ``multitask``, ``individual``), the adapter that reproduces each seen task's outputs
  under true-task routing: the task's expert's own adapter where the task uses one expert at
  weight 1, else ``DIR/task_TASK/``, the fixed mixture ``sum_i w_i s_i B_i A_i`` as one LoRA of
  rank ``sum_i r_i`` (the ``A_i`` stacked, the ``w_i s_i B_i`` side by side, alpha = rank so
  PEFT's scale is 1);
- ``DIR/routing.json``: the method, the base the adapters go on, every expert's adapter folder,
  modules and ranks, per task its experts and its adapter folder (relative to ``DIR``), and how
  the method routes. Where routing depends on the sample or the token (a task locator, a task
  prior, instruction groups and centroids, gates, top-k), no per-task adapter is written: any
  fixed one would be an approximation; routing.json and the command say so.

The base is the plain transformers model: for the transformers MLLMs (Llava, Qwen2-VL, Qwen3-VL,
InternVL) the ``...ForConditionalGeneration`` itself, for a composed backbone its language model
(``ComposedMLLM.language_model``, a ``...ForCausalLM``; the vision tower and projector carry no
experts). Every ``adapter_config.json`` names its class (``auto_mapping``) and the folder it loads
from (``base_model_name_or_path``), so ``peft.AutoPeftModel.from_pretrained(DIR/ADAPTER)`` builds
the base and puts the adapter on it. That folder is:

- a run on a checkpoint (``model.backbone_path``): that checkpoint, absolute (a composed
  backbone saved by mllm-cl: its ``llm/`` folder);
- a packaged pretrained preset (``tiny-base``, ``tiny-base-coin``): its ``llm/`` folder in the
  installed package;
- a random tiny preset (no files of its own: rebuilt from its name and seed): ``DIR/base/``,
  the language model and tokenizer written there by the export (the path is absolute: a moved
  ``DIR`` needs it edited).

``load_base(routing["base"])`` builds the same base from what the run recorded.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllm_cl.use.quiet import restore_quietly

if TYPE_CHECKING:  # torch is imported when the command runs, not to build the parser
    import torch
    from torch import nn

HELP = ("write a run's experts as PEFT LoRA adapters, each once, that peft.AutoPeftModel loads with their base; "
        "routing.json")

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
    p.add_argument("--verbose", action="store_true",
                   help="also print what rebuilding the run prints (the seed, the check of the task files)")
    p.epilog = ("Each adapter_config.json names its base: the run's model.backbone_path (absolute), a packaged "
                "preset's llm/ folder, or, for a random tiny preset, DIR/base/ (written by the export): "
                "peft.AutoPeftModel.from_pretrained(DIR or DIR/ADAPTER) loads base and adapter.")


# ------------------------------------------------------------------------------------ the base
def peft_base(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(the plain model PEFT adapts, the prefix of its module names inside ``backbone``)."""
    if hasattr(backbone, "hf"):  # HFMLLM: the transformers MLLM itself
        return backbone.hf, "hf."
    if hasattr(backbone, "language_model"):  # ComposedMLLM: its causal LM
        return backbone.language_model, "language_model."
    raise TypeError(f"no PEFT base known for a {type(backbone).__name__} backbone")


def _build(info: dict[str, Any]):
    # heavy: torch, lightning and transformers; the command loads without it
    from mllm_cl.backbones.presets import build_backbone
    from mllm_cl.system.module import parse_dtype

    return build_backbone(info.get("preset"), path=info.get("path"), seed=info.get("seed", 0),
                          dtype=parse_dtype(info.get("dtype"), "dtype"), image_size=info.get("image_size"),
                          overrides=info.get("overrides"))


def load_base(info: dict[str, Any]) -> nn.Module:
    """The plain base model (no expert layers) from routing.json's ``base`` (a run's backbone record)."""
    return peft_base(_build(info).model)[0].eval()


def base_path(info: dict[str, Any], out: str | Path) -> Path:
    """The folder the adapters' base loads from (``base_model_name_or_path``), absolute: the run's
    checkpoint (a composed one's ``llm/``), a packaged preset's ``llm/``, or ``out/base``, written
    here from the preset and seed of a random tiny preset."""
    from mllm_cl.backbones.presets import PACKAGED  # heavy: transformers; the command loads without it

    if info.get("path"):
        path = Path(info["path"])
        return (path / "llm" if (path / "mllm_cl.json").is_file() else path).resolve()
    if info.get("preset") in PACKAGED:
        return (PACKAGED[info["preset"]] / "llm").resolve()
    folder = Path(out, "base").resolve()
    built = _build(info)
    peft_base(built.model)[0].save_pretrained(str(folder))
    built.tokenizer.save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------- mixtures
def fixed_mixture(layer, task: int) -> dict[str, float] | None:
    """Task ``task``'s fixed expert weights in ``layer`` under true-task routing ({} = no expert: the
    base output), or ``None`` when the layer's routing depends on the input."""
    from mllm_cl.experts import FixedRouter, TaskRouter  # heavy: torch; the command loads without it

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


def alone(layers, mixtures: dict[str, dict[str, float]]) -> str | None:
    """The expert a task's ``mixtures`` (per layer name) amount to, when that is one expert at weight 1
    in every layer that holds it and nothing elsewhere: its adapter is the task's. Else ``None``."""
    used = {e for mix in mixtures.values() for e in mix}
    if len(used) != 1:
        return None
    (expert,) = used
    holds = all(mixtures[name] == ({expert: 1.0} if expert in layer.expert_names else {})
                for name, layer in layers.items())
    return expert if holds else None


def _lora(layer, mixture: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (R, in), B (out, R)) with ``B A = sum_i w_i s_i B_i A_i``: PEFT's scale must be 1 (alpha = R)."""
    import torch  # heavy: torch; the command loads without it

    experts = [(layer.experts[n], w) for n, w in mixture.items()]
    A = torch.cat([e.A.detach() for e, _ in experts])
    B = torch.cat([e.B.detach() * (w * e.scale) for e, w in experts], dim=1)
    return A, B


# ---------------------------------------------------------------------------------- writing
def write_adapter(folder: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], *,
                  base_name: str | None, base_class: type | None = None) -> None:
    """A PEFT LoRA adapter: ``modules`` maps a module name of the base to (A (r, in), B (out, r), alpha).
    ``base_class``: the base's transformers class, recorded as PEFT's ``auto_mapping`` (what
    ``AutoPeftModel`` builds the base with)."""
    # heavy: peft and torch; the command loads without it
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {n: a.shape[0] for n, (a, _, _) in modules.items()}
    alphas = {n: alpha for n, (_, _, alpha) in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regexes against the end of a module name: escaped full names match one module
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(modules), lora_dropout=0.0, bias="none",
                        rank_pattern={re.escape(n): k for n, k in ranks.items() if k != r},
                        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
                        base_model_name_or_path=base_name, inference_mode=True)
    folder.mkdir(parents=True, exist_ok=True)
    auto = None if base_class is None else {"base_model_class": base_class.__name__,
                                            "parent_library": base_class.__module__}
    config.save_pretrained(str(folder), auto_mapping_dict=auto)
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
    from mllm_cl.experts import expert_layers  # heavy: torch; the command loads without it

    module, dm, stage = restored.module, restored.datamodule, restored.stage
    method, out = module.method, Path(out)
    base, prefix = peft_base(module.model)
    layers = expert_layers(module.model)
    for name in layers:
        if not name.startswith(prefix):
            raise RuntimeError(f"expert layer {name} lies outside the PEFT base ({prefix.rstrip('.')}); "
                               "adapters there cannot be exported")
    local = {name: name[len(prefix):] for name in layers}
    info = dict(module.backbone_info)
    # every expert alone
    experts: dict[str, dict[str, tuple]] = {}
    for name, layer in layers.items():
        for e in layer.expert_names:
            x = layer.experts[e]
            experts.setdefault(e, {})[local[name]] = (x.A.detach(), x.B.detach(), x.alpha)
    folders = {e: "." if len(experts) == 1 else e for e in experts}  # one adapter: DIR itself
    # every seen task's mixture, where its routing is fixed
    names = dm.task_names
    seen = list(range(len(names) if method.one_row else stage))
    fixed = method.fixed_routing and all(fixed_mixture(layer, t) is not None for layer in layers.values() for t in seen)
    mixtures = {t: {name: fixed_mixture(layer, t) for name, layer in layers.items()} for t in seen} if fixed else {}
    task_adapters: dict[int, dict[str, tuple]] = {}
    for t, mix in mixtures.items():
        if alone(layers, mix) is None and any(mix.values()):
            task_adapters[t] = {}
            for name, m in mix.items():
                if m:
                    A, B = _lora(layers[name], m)
                    task_adapters[t][local[name]] = (A, B, float(A.shape[0]))
    base_dir = str(base_path(info, out)) if experts else None
    for e, modules in experts.items():
        write_adapter(out / folders[e], modules, base_name=base_dir, base_class=type(base))
    for t, modules in task_adapters.items():
        write_adapter(out / f"task_{names[t]}", modules, base_name=base_dir, base_class=type(base))
    tasks: dict[str, Any] = {}
    for t in seen:
        if fixed:
            used = sorted({e for m in mixtures[t].values() for e in m})
            weights = {e: sorted({m[e] for m in mixtures[t].values() if e in m}) for e in used}
            expert = alone(layers, mixtures[t])
            adapter = folders[expert] if expert is not None else f"task_{names[t]}" if t in task_adapters else None
            tasks[names[t]] = {"experts": {e: (w[0] if len(w) == 1 else w) for e, w in weights.items()},
                               "adapter": adapter}
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
                 "peft_base_class": f"{type(base).__module__}.{type(base).__name__}",
                 "peft_base_path": base_dir,
                 "load": "peft.AutoPeftModel.from_pretrained(DIR/ADAPTER), or "
                         "mllm_cl.use.export.load_base(routing['base'])"},
        "routing": "fixed per task" if fixed else "depends on the sample or the token",
        "how": HOW.get(method.name, "routers: " + ", ".join(f"{k} ({v['level']} level)"
                                                            for k, v in _routers(layers).items())),
        "per_task_adapters": fixed,
        "note": None if fixed else ("no per-task adapter: this method's routing depends on the sample or the token, "
                                    "so any one fixed adapter would approximate it; each expert is exported alone "
                                    "and the routers (and any locator, prior or prototypes) stay in the run's "
                                    "checkpoints"),
        "routers": _routers(layers),
        "experts": {e: {"adapter": folders[e], "modules": len(m),
                        "ranks": dict(sorted(Counter(a.shape[0] for a, _, _ in m.values()).items()))}
                    for e, m in sorted(experts.items())},
        "tasks": tasks,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(routing, indent=1) + "\n")
    return routing


def run(args: argparse.Namespace) -> int:
    restored = restore_quietly(args.run, args.stage, verbose=args.verbose)
    routing = export(restored, args.out)
    out = Path(args.out)
    print(f"mllm-cl export: {routing['method']} at stage {routing['stage']:02d} -> {out}")
    for e, entry in routing["experts"].items():
        print(f"  {out / entry['adapter']}: expert {e} on {entry['modules']} modules "
              f"(rank {', '.join(map(str, entry['ranks']))})")
    for task, entry in routing["tasks"].items():
        if entry["adapter"]:
            mix = " + ".join(f"{w} {e}" if w != 1.0 else e for e, w in entry["experts"].items())
            print(f"  {out / entry['adapter']}: task {task} exactly ({mix})")
    if routing["base"]["peft_base_path"]:
        print(f"  base: {routing['base']['peft_base_path']} ({routing['base']['peft_base_class']}; "
              "peft.AutoPeftModel.from_pretrained loads it with an adapter)")
    if routing["note"]:
        print(f"  routing: {routing['how']}")
        print(f"  {routing['note']}")
    print(f"  routing.json: {out / 'routing.json'}")
    return 0
