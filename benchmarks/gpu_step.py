"""One training step on a GPU: a ~0.5B-parameter random Llama with 8 LoRA experts per targeted layer
(top-2 token routing) vs the same model with one PEFT LoRA, same targets and rank.

Prints the median per-round ratio of step times (forward + backward + AdamW step over the trainable
parameters), its spread, and each variant's peak GPU memory. The base is bf16 and frozen; adapters
are fp32 (mllm-cl's default ``expert_dtype``), as PEFT keeps them when autocast is off.

    python benchmarks/gpu_step.py [--rounds 15] [--experts 8] [--batch 8] [--seq 512]

Needs CUDA: without it the script says so and exits with status 2 (``--device cpu`` runs it on the
CPU to check the script itself; those times mean nothing and no memory is reported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, ratio_line  # noqa: E402

from mllm_cl.experts import ExpertSetup, TopKRouter, expert_layers  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def base_model(args) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=torch.bfloat16)
    return model.requires_grad_(False)


def ours(args) -> nn.Module:
    model = base_model(args)
    ExpertSetup(TARGETS, rank=args.rank, router=lambda d: TopKRouter(d, top_k=2)).apply(model)
    for layer in expert_layers(model).values():
        layer.expert_dtype = torch.float32
        for i in range(args.experts):
            nn.init.normal_(layer.add_expert(f"e{i}").B, std=0.02)
        layer.routers.to(torch.float32)
    return model


def peft(args) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(args), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    return model


def stepper(model: nn.Module, batch: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if batch.is_cuda:
            torch.cuda.synchronize()

    return step, sum(p.numel() for p in params)


def peak_memory(step) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs both variants once)")
    ap.add_argument("--experts", type=int, default=8, help="experts per targeted layer (top-2 routed)")
    ap.add_argument("--rank", type=int, default=8, help="rank of every expert and of the PEFT LoRA")
    ap.add_argument("--width", type=int, default=1024, help="hidden size (1024 x 24 layers: ~0.44B parameters)")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run of the script)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step.py needs CUDA and found none; nothing measured", file=sys.stderr)
        return 2
    batch = torch.randint(0, 32000, (args.batch, args.seq), device=args.device)
    models = {"mllm-cl experts": ours(args), "PEFT LoRA": peft(args)}
    total = sum(p.numel() for p in models["PEFT LoRA"].parameters() if not p.requires_grad)
    steps, trainable = {}, {}
    for name, model in models.items():
        steps[name], trainable[name] = stepper(model, batch)
    memory = {name: peak_memory(step) for name, step in steps.items()}
    times = interleaved(steps, rounds=args.rounds)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke run: times mean nothing)"
    print(f"device {where}, torch {torch.__version__}, base {total / 1e9:.2f}B params (bf16), "
          f"batch {args.batch} x {args.seq} tokens, rank {args.rank}, targets {'/'.join(TARGETS)}")
    for name in models:
        print(f"  {name:<18} step {statistics.median(times[name]) * 1e3:8.1f} ms   peak {memory[name]:6.2f} GiB   "
              f"trainable {trainable[name] / 1e6:.2f}M")
    print(ratio_line(f"{args.experts} experts top-2 / one PEFT LoRA", times["mllm-cl experts"], times["PEFT LoRA"]))
    print(f"peak memory ratio {memory['mllm-cl experts'] / memory['PEFT LoRA']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
