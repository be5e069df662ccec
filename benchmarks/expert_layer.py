"""Expert-layer cost: forward + backward on a frozen 1024x1024 linear, 2048 tokens, rank 8.

Prints, as medians of per-round ratios with their spread (the target for (a) is <= 1.15):
  (a) one expert / PEFT LoRA of the same rank
  (b) a pool of 64 experts / a pool of 2, both routed top-2 per token
  (c) the same with routing-based CL's post-hoc gate router (standardized gate
      scores, top-2)
and, for reference, CoIN-style dense MoELoRA (softmax over every expert) 64 / 2.

    python benchmarks/expert_layer.py [--rounds 21] [--threads 2] [--device cpu|cuda]

On a GPU (``--device cuda``) every timed call ends with a CUDA synchronize, so the time is
the kernels' and not the launch's.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, ratio_line  # noqa: E402

from mllm_cl.experts import ExpertLayer, PostHocGateRouter, SoftmaxRouter, TopKRouter  # noqa: E402


def expert_layer(linear: nn.Linear, pool: int, router, rank: int) -> ExpertLayer:
    layer = ExpertLayer(linear, router=router, rank=rank)
    for i in range(pool):
        nn.init.normal_(layer.add_expert(f"e{i}").B, std=0.02)
    for p in layer.routers.parameters():  # gates start at zero: give them trained-like values
        nn.init.normal_(p, std=0.02)
    return layer


def peft_lora(linear: nn.Linear, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Sequential()
    wrapper.add_module("proj", linear)
    model = get_peft_model(wrapper, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))
    nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight, std=0.02)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=21, help="timed rounds (each runs every variant once)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--dim", type=int, default=1024, help="in = out features of the frozen linear")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch 8 x tokens/8)")
    ap.add_argument("--rank", type=int, default=8, help="rank of every expert")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the layers run")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch here")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, r = args.dim, args.rank

    def fresh_linear() -> nn.Linear:
        lin = nn.Linear(d, d)
        lin.requires_grad_(False)
        return lin

    modules = {
        "peft_lora": peft_lora(fresh_linear(), r),
        "one_expert": expert_layer(fresh_linear(), 1, None, r),
        "top2_pool2": expert_layer(fresh_linear(), 2, TopKRouter(d, top_k=2), r),
        "top2_pool16": expert_layer(fresh_linear(), 16, TopKRouter(d, top_k=2), r),
        "top2_pool64": expert_layer(fresh_linear(), 64, TopKRouter(d, top_k=2), r),
        "gates_pool2": expert_layer(fresh_linear(), 2, PostHocGateRouter(d, top_k=2), r),
        "gates_pool16": expert_layer(fresh_linear(), 16, PostHocGateRouter(d, top_k=2), r),
        "gates_pool64": expert_layer(fresh_linear(), 64, PostHocGateRouter(d, top_k=2), r),
        "dense_pool2": expert_layer(fresh_linear(), 2, SoftmaxRouter(d), r),
        "dense_pool64": expert_layer(fresh_linear(), 64, SoftmaxRouter(d), r),
    }
    modules = {k: m.to(device) for k, m in modules.items()}
    x = torch.randn(8, args.tokens // 8, d, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(module: nn.Module):
        def run() -> None:
            xi = x.detach().requires_grad_(True)  # the layer sits inside a network: input grads are needed
            module(xi).square().mean().backward()
            module.zero_grad(set_to_none=True)
            sync()

        return run

    times = interleaved({k: step(m) for k, m in modules.items()}, rounds=args.rounds)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, threads {args.threads}"
    print(f"torch {torch.__version__}, {where}, {args.rounds} rounds, "
          f"linear {d}x{d}, {args.tokens} tokens, rank {r}; forward+backward")
    print(ratio_line("(a) one expert / PEFT LoRA", times["one_expert"], times["peft_lora"]))
    print(ratio_line("(b) top-2: pool 64 / pool 2", times["top2_pool64"], times["top2_pool2"]))
    print(ratio_line("(b') top-2: pool 64 / pool 16 (both dispatch)", times["top2_pool64"], times["top2_pool16"]))
    print(ratio_line("(c) post-hoc gates top-2: pool 64 / pool 2", times["gates_pool64"], times["gates_pool2"]))
    print(ratio_line("(c') post-hoc gates top-2: pool 64 / pool 16", times["gates_pool64"], times["gates_pool16"]))
    print(ratio_line("(ref) dense MoELoRA: pool 64 / pool 2", times["dense_pool64"], times["dense_pool2"]))


if __name__ == "__main__":
    main()
