"""A ten-second demo of the expert stack on a tiny random MLLM (CPU).

It builds a tiny vision + language model from configuration, injects a pool
of LoRA experts with a top-k token router into the language model's
attention projections, prints what was injected and what trains, and teaches
the model a toy visual task (name the colour of a plain image) with only the
experts and routers trainable. It prints the loss and the exact-match accuracy
of greedy answers before and after.

For the continual loop itself (a task sequence, an accuracy matrix, a report)
run `mllm-cl quickstart` (the pretrained tiny base, minutes on a CPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from mllm_cl.backbones import PRESETS, build_preset
from mllm_cl.console import Progress
from mllm_cl.experts import ExpertSetup, TopKRouter, expert_layers, mark_only_experts_trainable

HELP = "train a pool of LoRA experts on a toy colour task (tiny model, CPU, ~10 s)"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny-clip-llama", choices=list(PRESETS),
                   help="tiny backbone preset (default: %(default)s)")
    p.add_argument("--experts", type=int, default=4, help="experts per adapted layer (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=2, help="experts each token is routed to (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of each expert (default: %(default)s)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj", "up_proj"],
                   help="module names to adapt, in the language model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=150, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model, data and training (default: %(default)s)")


def _batch(tok, model, names: list[str], generator: torch.Generator):
    """Plain-colour images with noise; prompt '<image> colour?' and answer ' NAME</s>'."""
    size = model.image_size
    mean = torch.tensor(model.vision.mean).view(3, 1, 1)
    std = torch.tensor(model.vision.std).view(3, 1, 1)
    pixels = []
    for name in names:
        rgb = torch.tensor(COLOURS[name], dtype=torch.float32).view(3, 1, 1) / 255
        img = (rgb + 0.05 * torch.randn(3, size, size, generator=generator)).clamp(0, 1)
        pixels.append((img - mean) / std)
    prompt = [tok.bos_token_id] + [tok.image_token_id] * model.num_image_tokens + tok(" colour?").input_ids
    answers = [tok(" " + n).input_ids + [tok.eos_token_id] for n in names]
    width = len(prompt) + max(len(a) for a in answers)
    ids = torch.full((len(names), width), tok.pad_token_id)
    labels = torch.full((len(names), width), -100)
    mask = torch.zeros(len(names), width, dtype=torch.long)
    for i, a in enumerate(answers):
        seq = prompt + a
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt): len(seq)] = torch.tensor(a)
        mask[i, : len(seq)] = 1
    return ids, mask, labels, torch.stack(pixels), torch.tensor([prompt] * len(names))


@torch.no_grad()
def _accuracy(model, tok, names, generator) -> float:
    model.eval()
    _, _, _, pixels, prompt = _batch(tok, model, names, generator)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixels,
                         max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = [tok.decode(o, skip_special_tokens=True).strip() for o in out]
    model.train()
    return sum(a == n for a, n in zip(answers, names, strict=False)) / len(names)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    t0 = time.time()
    backbone = build_preset(args.preset, seed=args.seed)
    model, tok = backbone.model, backbone.tokenizer
    setup = ExpertSetup(
        args.targets,
        rank=args.rank,
        router=lambda d: TopKRouter(d, top_k=args.top_k),
        initial_experts=[f"e{i}" for i in range(args.experts)],
    )
    print(setup.apply(model))
    mark_only_experts_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    layers = expert_layers(model)
    print(f"{len(layers)} expert layers x {args.experts} experts (top-{args.top_k}, rank {args.rank}); "
          f"trainable {trainable:,} of {total:,} parameters")

    g = torch.Generator().manual_seed(args.seed)
    eval_names = [list(COLOURS)[i % len(COLOURS)] for i in range(32)]
    before = _accuracy(model, tok, eval_names, torch.Generator().manual_seed(args.seed + 1))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    names_all = list(COLOURS)
    losses = []
    bar = Progress(args.steps, "training experts", "step")
    for _ in range(args.steps):
        names = [names_all[i] for i in torch.randint(len(names_all), (args.batch_size,), generator=g)]
        ids, mask, labels, pixels, _ = _batch(tok, model, names, g)
        loss = model(ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optim.step()
        losses.append(loss.item())
        bar.update(note=f"loss {loss.item():.3f}")
    bar.close()
    after = _accuracy(model, tok, eval_names, torch.Generator().manual_seed(args.seed + 1))
    first = sum(losses[:10]) / max(1, len(losses[:10]))
    last = sum(losses[-10:]) / max(1, len(losses[-10:]))
    print(f"loss {first:.3f} -> {last:.3f} (mean of first / last 10 steps)")
    print(f"colour exact match on 32 held-out images: {before:.0%} before, {after:.0%} after")
    print(f"done in {time.time() - t0:.0f}s")
    return 0
