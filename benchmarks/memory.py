"""What a 7B run costs: activation bytes per token at real width, parameters and state at LLaVA-1.5-7B.

    python benchmarks/memory.py                 # the table, and docs/memory.md
    python benchmarks/memory.py --width 256 --mlp 688 --heads 4 --vocab 1024 --tokens 64 --no-doc   # seconds

1. Saved-for-backward bytes per token per decoder layer, for every method config and for PEFT LoRA on
   lora_ft's modules: a model built at real width (default 4096 / MLP 11008 / 32 heads, 2 decoder
   layers, vocabulary 32064), bf16 base under bf16 autocast on the CPU, one forward of ``--tokens``
   tokens (16 image tokens, the last ``--answer`` supervised), each method in the state of its second
   task, with and without activation checkpointing (``mllm_cl.system.memory.SavedBytes``). Beside it:
   the bytes outside the decoder layers (embeddings, final norm, output head and loss) per token, for
   the loss at supervised positions and for the full-vocabulary logits of every position.
2. On the ``meta`` device (no memory, no weights), LLaVA-1.5-7B (CLIP ViT-L/14-336, Llama 4096 x 32,
   MLP 11008, vocabulary 32064) with each method injected and replayed through 8 tasks: parameters
   (total, trained in the last task), the method's state, and the checkpoint a task writes.
3. From 1 and 2, the estimated peak memory per GPU at ``--samples`` x ``--seq`` tokens: weights (bf16
   base, fp32 adapters), AdamW state and gradients of what trains, activations (32 layers x the
   per-layer bytes, plus the head).

Everything here is computed on the CPU; a GPU run measures what it estimates.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mllm_cl.data.collate import supervised_positions  # noqa: E402
from mllm_cl.experts import expert_layers  # noqa: E402
from mllm_cl.system.memory import SavedBytes, observed_bytes, peak_bytes, replay_structure  # noqa: E402

METHODS = ["lora_ft", "moelora", "individual", "multitask", "routing", "same", "cram", "cmoe"]
KiB, GiB = 1024, 1024 ** 3
LLAVA_LAYERS = 32


def load_method(name: str):
    from jsonargparse import ArgumentParser

    from mllm_cl.methods import Method

    parser = ArgumentParser()
    parser.add_argument("--method", type=Method)
    spec = yaml.safe_load((ROOT / "configs" / "methods" / f"{name}.yaml").read_text())["model"]["method"]
    return parser.instantiate(parser.parse_object({"method": spec})).method


def shape(args) -> dict:
    return {"llm_width": args.width, "llm_mlp": args.mlp, "heads": args.heads, "kv_heads": args.heads,
            "llm_layers": 2, "vocab_size": args.vocab, "tie_embeddings": False, "max_positions": args.tokens + 8}


def make_batch(module, args) -> dict:
    g = torch.Generator().manual_seed(0)
    n_img = module.model.num_image_tokens
    image = module.model.image_token_id
    ids = torch.randint(3, 200, (args.batch, args.tokens), generator=g)
    ids = ids.masked_fill(ids == image, image + 1)  # text tokens are never the image placeholder
    ids[:, 1:1 + n_img] = image
    labels = torch.full_like(ids, -100)
    labels[:, -args.answer:] = ids[:, -args.answer:]
    side = module.model.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "loss_positions": supervised_positions(labels), "image_mask": ids == module.model.image_token_id,
            "pixel_values": torch.randn(args.batch, 3, side, side, generator=g),
            "has_image": torch.ones(args.batch).bool(),
            "task_ids": torch.ones(args.batch, dtype=torch.long), "instruction": ["What is shown?"] * args.batch,
            "ids": [f"s{i}" for i in range(args.batch)], "index": list(range(args.batch))}


def count(module, batch, *, checkpointing: bool, full_logits: bool = False) -> dict:
    from mllm_cl.experts import checkpoint_contexts, routing_context

    module.model.set_checkpointing(checkpointing, context_fn=checkpoint_contexts(module.model))
    meter = SavedBytes(module.model)
    with torch.autocast("cpu", dtype=torch.bfloat16), meter.count():
        if full_logits:  # the loss over the (batch, length, vocab) logits of every position
            with routing_context(module.model, module.method.routing_context(batch, training=True)):
                loss = module.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                    pixel_values=batch["pixel_values"], labels=batch["labels"], use_cache=False).loss
        else:
            loss, extra = module.forward_batch(batch, training=True)
    tokens = batch["input_ids"].numel()
    out = {"layer": sum(meter.per_layer) / len(meter.per_layer) / tokens, "rest": meter.rest / tokens,
           "observed": observed_bytes(module.model) / len(meter.per_layer)}
    del loss
    return out


def activation_rows(args) -> list[dict]:
    from mllm_cl.system.module import ContinualMLLM

    rows = []
    for name in args.methods:
        method = load_method(name)
        module = ContinualMLLM(method, backbone_overrides=shape(args), precision="bf16-mixed")
        module.train()
        replay_structure(method, module.model, 1, feature_dim=args.width)
        method.on_task_start(module.model, 1)
        batch = make_batch(module, args)
        for phase in method.phases(1, 2):
            method.on_phase_start(module.model, 1, phase)
            row = {"method": name, "phase": phase.name}
            try:
                row.update(plain=count(module, batch, checkpointing=False),
                           checkpointed=count(module, batch, checkpointing=True))
                if name == "lora_ft":
                    row["full_logits"] = count(module, batch, checkpointing=False, full_logits=True)
            except Exception as e:  # noqa: BLE001 -- a method that cannot run here is a row that says why
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(_activation_line(row), flush=True)
        del module, method
        gc.collect()
    rows.append(peft_row(args))
    print(_activation_line(rows[-1]), flush=True)
    return rows


def peft_row(args) -> dict:
    """PEFT's LoRA on lora_ft's modules and rank, on the same base."""
    from peft import LoraConfig, inject_adapter_in_model

    from mllm_cl.methods import ZeroShot
    from mllm_cl.system.module import ContinualMLLM

    setup = load_method("lora_ft").experts
    module = ContinualMLLM(ZeroShot(), backbone_overrides=shape(args), precision="bf16-mixed")
    inject_adapter_in_model(LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank,
                                       target_modules=list(setup.target_modules)),
                            module.model.language_model)
    for n, p in module.model.named_parameters():  # fp32 adapters over the bf16 base, as PeftModel keeps them
        if "lora_" in n:
            p.data = p.data.float()
    module.train()
    batch = make_batch(module, args)
    row = {"method": "PEFT LoRA", "phase": "train", "plain": count(module, batch, checkpointing=False),
           "checkpointed": count(module, batch, checkpointing=True)}
    del module
    gc.collect()
    return row


def _activation_line(row: dict) -> str:
    if "error" in row:
        return f"{row['method']:>10} {row['phase']:>7}  n/a: {row['error'][:120]}"
    p, c = row["plain"], row["checkpointed"]
    return (f"{row['method']:>10} {row['phase']:>7}  {p['layer'] / KiB:8.1f} KiB/token/layer  checkpointed "
            f"{c['layer'] / KiB:6.1f}  head {p['rest'] / KiB:6.1f} KiB/token")


# ------------------------------------------------------------------ LLaVA-1.5-7B on the meta device
def llava_7b():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mllm_cl.backbones.hf_mllm import LlavaMLLM

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=LLAVA_LAYERS,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    mean, std = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
    return LlavaMLLM(hf.to(torch.bfloat16), image_size=336, image_mean=mean, image_std=std)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def structure_rows(args) -> tuple[int, list[dict]]:
    from mllm_cl.backbones import byte_tokenizer

    base_params = sum(p.numel() for p in llava_7b().parameters())
    rows = []
    for name in args.methods:
        model = llava_7b()
        method = load_method(name)
        method.tokenizer = byte_tokenizer()
        row = {"method": name}
        try:
            method.build(model)
            for layer in expert_layers(model).values():
                layer.expert_dtype = torch.float32
            T = args.tasks
            task_end = name != "same"  # SAME's task end is a covariance snapshot (no structure); not on meta
            replay_structure(method, model, T - 1, feature_dim=4096, task_end=task_end)
            method.on_task_start(model, T - 1)
            trained = {}
            for phase in method.phases(T - 1, T):
                method.on_phase_start(model, T - 1, phase)
                trained.update({n: p for n, p in model.named_parameters() if p.requires_grad})
            if task_end:
                method.on_task_end(model, T - 1)
            adapters = [v for layer in expert_layers(model).values() for k, v in layer.state_dict().items()
                        if not k.startswith("base_layer.")]
            buffers = [b for layer in expert_layers(model).values() for b in layer.buffers()
                       if not any(b is p for p in layer.base_layer.buffers())]
            _, state = method.state()
            row.update(total=sum(p.numel() for p in model.parameters()),
                       trained=sum(p.numel() for p in trained.values()),
                       trained_bytes=_bytes(trained.values()), state=_bytes(buffers) + _bytes(state.values()),
                       checkpoint=_bytes(adapters) + _bytes(state.values()), layers=len(expert_layers(model)))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(_structure_line(row), flush=True)
        del model, method
        gc.collect()
    return base_params, rows


def _structure_line(row: dict) -> str:
    if "error" in row:
        return f"{row['method']:>10}  n/a: {row['error'][:160]}"
    return (f"{row['method']:>10}  total {row['total'] / 1e9:.3f}B  trained in task 8 {row['trained'] / 1e6:7.2f}M  "
            f"state {row['state'] / 2 ** 20:8.1f} MiB  checkpoint {row['checkpoint'] / 2 ** 20:8.1f} MiB")


# --------------------------------------------------------------------------------- the estimate
def estimate(base_params: int, act: dict, struct: dict, args) -> float:
    """Peak bytes per GPU: bf16 base, fp32 trainable weights + gradients + AdamW's two moments, the
    adapters and state, and the activations of ``samples x seq`` tokens over 32 layers plus the head."""
    mode = act["checkpointed"]
    return peak_bytes(base_bytes=2 * base_params, adapter_bytes=struct["checkpoint"],
                      trained_bytes=struct["trained_bytes"], tokens=args.samples * args.seq, layers=LLAVA_LAYERS,
                      layer_bytes_per_token=mode["layer"], head_bytes_per_token=act["plain"]["rest"],
                      observed_per_layer=mode["observed"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4096, help="LLM width")
    parser.add_argument("--mlp", type=int, default=11008, help="LLM MLP width")
    parser.add_argument("--heads", type=int, default=32, help="attention heads (as many KV heads)")
    parser.add_argument("--vocab", type=int, default=32064, help="vocabulary size")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sample in the measured forward")
    parser.add_argument("--answer", type=int, default=32, help="supervised (answer) tokens per sample")
    parser.add_argument("--batch", type=int, default=1, help="samples in the measured forward")
    parser.add_argument("--tasks", type=int, default=8, help="tasks replayed on the meta LLaVA-1.5-7B")
    parser.add_argument("--samples", type=int, default=16, help="samples per GPU for the estimate")
    parser.add_argument("--seq", type=int, default=750, help="tokens per sample for the estimate")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="method configs (configs/methods/NAME.yaml)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-doc", action="store_true", help="print only; do not write docs/memory.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"activations: width {args.width}, MLP {args.mlp}, {args.heads} heads, vocab {args.vocab}, "
          f"{args.batch} x {args.tokens} tokens ({args.answer} supervised), bf16 base under bf16 autocast, CPU")
    act = activation_rows(args)
    print(f"LLaVA-1.5-7B on the meta device, {args.tasks} tasks")
    base_params, struct = structure_rows(args)
    text = render(args, act, base_params, struct)
    print(text)
    if not args.no_doc:
        (ROOT / "docs" / "memory.md").write_text(text)
        print(f"wrote {ROOT / 'docs' / 'memory.md'}")


def _fmt(v: float) -> str:
    return f"{v / KiB:.1f}"


def render(args, act: list[dict], base_params: int, struct: list[dict]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    peft = next(r for r in act if r["method"] == "PEFT LoRA")
    lora = next(r for r in act if r["method"] == "lora_ft" and "plain" in r)
    lines = ["# What a 7B run costs", "",
             "Computed on the CPU by `python benchmarks/memory.py` (no GPU measured these numbers; every figure "
             "for 32 layers is an estimate from the per-layer ones).", "",
             f"Commit {commit}, {datetime.date.today().isoformat()}, {platform.machine()} CPU, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}.", "",
             "## Activations kept for backward", "",
             f"Per token per decoder layer, at width {args.width} / MLP {args.mlp} / {args.heads} heads (2 layers "
             f"built with random weights), bf16 base under bf16 autocast, {args.batch} x {args.tokens} tokens of "
             f"which {args.answer} supervised, each method in its second task. *Checkpointed*: "
             "`model.gradient_checkpointing: true` (each layer keeps its bf16 input; the rest is recomputed). "
             "*Observed*: what a method's statistics keep per layer from the step's forward (SAME's rows, "
             "CRAM's per-sample image mean), a fixed size, not per token.", "",
             "| method | phase | KiB / token / layer | checkpointed | x PEFT LoRA | observed per layer |",
             "|---|---|---|---|---|---|"]
    for r in act:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['phase']} | n/a: {r['error'][:100]} | | | |")
            continue
        p, c = r["plain"], r["checkpointed"]
        lines.append(f"| {r['method']} | {r['phase']} | {_fmt(p['layer'])} | {_fmt(c['layer'])} | "
                     f"{p['layer'] / peft['plain']['layer']:.2f} | {p['observed'] / KiB:.0f} KiB |")
    full = lora["full_logits"]["rest"]
    ours = lora["plain"]["rest"]
    lines += ["",
              "Outside the decoder layers (embeddings, final norm, output head, loss), per token of the sequence:", "",
              "| loss | KiB / token |", "|---|---|",
              f"| full-vocabulary logits at every position | {_fmt(full)} |",
              f"| logits at the supervised positions only (the framework's) | {_fmt(ours)} ({ours / full:.1%}) |", "",
              f"## LLaVA-1.5-7B, {args.tasks} tasks, on the meta device", "",
              f"Base: {base_params / 1e9:.3f}B parameters. CRAM and LLaVA-CMoE at the largest structure their options "
              "allow (every slot at `r_max`; a new expert in every layer every task); the others as their hooks "
              "build them. "
              "Trained: the parameters the last task trains; state: statistics buffers and the method's own tensors "
              "(SAME's covariance and snapshots, CRAM's prototypes, CMoE's locator); checkpoint: what a task writes "
              "(adapters of every task so far, routers, state), fp32.", "",
              "| method | total params | trained in task 8 | state | checkpoint per task |", "|---|---|---|---|---|"]
    for r in struct:
        if "error" in r:
            lines.append(f"| {r['method']} | n/a: {r['error'][:100]} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['total'] / 1e9:.3f}B | {r['trained'] / 1e6:.2f}M | "
                     f"{r['state'] / 2 ** 20:.1f} MiB | {r['checkpoint'] / 2 ** 20:.1f} MiB |")
    lines += ["", f"## Estimated peak memory per GPU: {args.samples} samples x {args.seq} tokens, checkpointing on", "",
              "bf16 base + fp32 adapters and state + fp32 gradient and AdamW moments of what trains + activations "
              f"({LLAVA_LAYERS} layers x the checkpointed bytes per token per layer, plus the head's).", "",
              "| method | estimated peak | fits 80 GB |", "|---|---|---|"]
    by_method = {}
    for r in act:
        if "error" not in r and r["method"] != "PEFT LoRA":
            prev = by_method.get(r["method"])
            if prev is None or r["checkpointed"]["layer"] > prev["checkpointed"]["layer"]:
                by_method[r["method"]] = r
    for s in struct:
        if "error" in s or s["method"] not in by_method:
            continue
        peak = estimate(base_params, by_method[s["method"]], s, args)
        lines.append(f"| {s['method']} | {peak / GiB:.1f} GiB | {'yes' if peak < 80e9 else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
