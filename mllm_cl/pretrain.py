"""``mllm-cl pretrain``: the tiny base model, pretrained on the synthetic caption set.

Like LLaVA before instruction tuning, the base must already see: a random
tower gives the continual methods nothing to route or forget. This trains a
small vision tower + projector + LLM fully (every parameter) on
"Describe the scene." captions, first single-object scenes (without that
warm-up, shape recognition stayed at chance in a first trial), then scenes of
one to three objects. A fraction of the captions (``word_fraction``) are of
written words ("the word fox is written."), over a reading list larger than the
OCR task's words: like the text-rich images in LLaVA's pretraining data, they
teach the tower to read, which a base seeing only shapes never learns from a
thousand OCR samples (the OCR task stayed at chance + 25 without them).
The tokenizer is a byte-level BPE trained on the text of every synthetic task
of the suite, so the continual tasks tokenize compactly too.

``--suite coin`` pretrains the CoIN-shaped suite's base instead, on its
``describe`` captions: bar charts, street signs, real handwritten digits, shape
scenes, dark photos and book covers in equal shares (as LLaVA's pretraining
covers its tasks' domains); the single-object warm-up then keeps captions
without "and" (single-object scenes, signs, digits, photos, covers).

    mllm-cl pretrain --config configs/pretrain_tiny.yaml
    mllm-cl pretrain --config configs/pretrain_coin.yaml

writes the backbone (``save_pretrained``) and ``pretrain.json`` (the config,
seed, data, final loss, held-out caption accuracy, per domain too) to ``out``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from tqdm import tqdm

from mllm_cl.data.collate import Collator
from mllm_cl.data.draw import render_word
from mllm_cl.data.encoding import ConversationEncoder
from mllm_cl.data.formats import Conversation
from mllm_cl.data.images import ImageProcessor
from mllm_cl.data.synth import SUITES, WORDS, Sample, sample
from mllm_cl.eval.rules import normalize

HELP = "pretrain the tiny base model on the synthetic caption set (configs/pretrain_tiny.yaml)"


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="mllm-cl pretrain", description=__doc__.replace("``", ""))  # no reST markup in --help
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with the options below")
    p.add_argument("--out", type=str, default="mllm_cl/assets/tiny-base", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data and order")
    p.add_argument("--suite", type=str, default="shapes", choices=["shapes", "coin"],
                   help="which synthetic suite's images to caption: shapes (scenes and written words; the base of "
                        "configs/experiments/synth.yaml) or coin (the six domains of the CoIN-shaped suite's "
                        "'describe' task; the base of configs/experiments/coin_like.yaml)")
    p.add_argument("--preset", type=str, default="tiny-clip-llama", help="backbone preset the geometry overrides")
    p.add_argument("--geometry", type=dict, default={"image_size": 48, "patch_size": 16, "vision_width": 96,
                                                     "vision_layers": 3, "llm_width": 128, "llm_layers": 4},
                   help="preset fields to override (image_size, patch_size, vision_width, llm_layers, ...)")
    p.add_argument("--vocab_size", type=int, default=400, help="BPE vocabulary trained on the synthetic text")
    p.add_argument("--captions", type=int, default=12000, help="caption samples to draw from")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--word_fraction", type=float, default=0.25,
                   help="share of each batch that is written-word captions (0: scenes only)")
    p.add_argument("--single_object_steps", type=int, default=400, help="first steps on single-object scenes only")
    p.add_argument("--batch_size", type=int, default=32, help="samples per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (cosine decay, 100 warm-up steps)")
    p.add_argument("--eval_samples", type=int, default=200, help="held-out captions scored at the end")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def _corpus(seed: int, image_size: int, suite: str) -> list[str]:
    """Text of every task of the suite (instructions and answers) and the chat template's words."""
    texts = ["USER: ASSISTANT:"] + [f" the word {w} is written." for w in READING]
    for task in SUITES[suite]:
        for i in range(300):
            s = sample(task, "train", i, seed=seed + 7, image_size=image_size)
            texts += [s.instruction, " " + s.answer]
    return texts


#: The caption task each suite's base is pretrained on.
CAPTION_TASK = {"shapes": "caption", "coin": "describe"}

# Written words the base learns to read: the OCR task's words and as many others.
READING = ("ant", "bag", "bed", "bee", "car", "cow", "egg", "elk", "fan", "fig", "gem", "hen", "ink", "jar", "leg",
           "log", "mug", "net", "nut", "oak", "pig", "pot", "rat", "rug", "saw", "tea", "toy", "van", "wig", "yak")


def _word_caption(i: int, seed: int, size: int, split: str):
    """Sample ``i`` of the written-word captions: a pure function of its coordinates."""
    rng = np.random.default_rng([seed, 77, {"train": 0, "test": 1}[split], i])
    words = WORDS + READING
    word = words[int(rng.integers(len(words)))]
    return Sample(render_word(word, size, rng), "Describe the scene.", f"the word {word} is written.", {})


def _encode(encoder, images, s):
    conv = Conversation("c", None, [("user", "<image>\n" + s.instruction), ("assistant", s.answer)])
    enc = encoder.encode_conversation(conv)
    return {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": images(s.image),
            "instruction": s.instruction, "task_id": 0, "id": "c", "index": 0}


def run(argv: list[str]) -> int:
    from mllm_cl.backbones import build_preset, train_bpe_tokenizer  # heavy: transformers; `--help` stays light

    cfg = _parser().parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    size = cfg.geometry.get("image_size", 48)
    tokenizer = train_bpe_tokenizer(_corpus(cfg.seed, size, cfg.suite), vocab_size=cfg.vocab_size)
    backbone = build_preset(cfg.preset, seed=cfg.seed, tokenizer=tokenizer, **cfg.geometry)
    model = backbone.model
    model.requires_grad_(True)  # pretraining trains everything, the tower included
    images = ImageProcessor.for_model(model)
    encoder = ConversationEncoder(tokenizer, num_image_tokens=model.num_image_tokens, template="short", max_length=256)
    collate = Collator(pad_token_id=tokenizer.pad_token_id, image_token_id=encoder.image_token_id)
    caption_task = CAPTION_TASK[cfg.suite]
    pool = [sample(caption_task, "train", i, seed=cfg.seed + 1000, image_size=size)
            for i in tqdm(range(cfg.captions), desc="drawing captions", unit="img", mininterval=1.0)]
    single = [s for s in pool if " and " not in s.answer]
    words = [_word_caption(i, cfg.seed, size, "train") for i in range(int(cfg.captions * cfg.word_fraction))]
    rng = random.Random(cfg.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, k / cfg.steps))))
    model.train()
    losses = []
    for step in (bar := tqdm(range(cfg.steps), desc="pretraining", unit="step", mininterval=1.0)):
        source = single if step < cfg.single_object_steps else pool
        picks = [rng.choice(words) if words and rng.random() < cfg.word_fraction else rng.choice(source)
                 for _ in range(cfg.batch_size)]
        batch = collate([_encode(encoder, images, s) for s in picks])
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                     labels=batch["labels"]).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    held_out = [sample(caption_task, "test", i, seed=cfg.seed + 1000, image_size=size)
                for i in range(cfg.eval_samples)]
    hits = _exact(model, encoder, images, tokenizer, held_out)
    accuracy = 100.0 * sum(hits) / len(hits)
    by_domain: dict[str, list[bool]] = {}
    for s, hit in zip(held_out, hits, strict=False):
        by_domain.setdefault((s.facts or {}).get("domain", "shapes"), []).append(hit)
    reading = None  # a base that saw no written-word captions is not scored on them
    if cfg.word_fraction > 0:
        hits = _exact(model, encoder, images, tokenizer,
                      [_word_caption(i, cfg.seed, size, "test") for i in range(cfg.eval_samples)])
        reading = 100.0 * sum(hits) / len(hits)
    model.requires_grad_(False)
    out_dir = Path(cfg.out)
    model.save_pretrained(out_dir, tokenizer)
    record = {"command": "mllm-cl pretrain " + " ".join(argv), "config": {k: v for k, v in vars(cfg).items()
                                                                         if k != "config"},
              "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
              "held_out_caption_exact_match": accuracy, "held_out_word_caption_exact_match": reading,
              "held_out_caption_exact_match_by_domain": {d: round(100.0 * sum(h) / len(h), 1)
                                                          for d, h in sorted(by_domain.items())},
              "seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"pretrained in {record['seconds']:.0f}s: loss {record['final_loss']}, held-out captions exactly right: "
          f"captions {accuracy:.1f}%, written words {'-' if reading is None else f'{reading:.1f}%'}; by domain "
          f"{record['held_out_caption_exact_match_by_domain']}; wrote {out_dir}")
    return 0


def _exact(model, encoder, images, tokenizer, held_out) -> list[bool]:
    """Whether each held-out caption is generated exactly (after normalization)."""
    from mllm_cl.eval.generation import greedy_generate  # heavy: transformers; `--help` stays light

    right = []
    for k in range(0, len(held_out), 50):
        chunk = held_out[k: k + 50]
        prompts = [encoder.encode_prompt("<image>\n" + s.instruction) for s in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        out = greedy_generate(model, ids, (ids != tokenizer.pad_token_id).long(),
                              torch.stack([images(s.image) for s in chunk]), max_new_tokens=64,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        right += [normalize(t) == normalize(s.answer) for t, s in zip(texts, chunk, strict=False)]
    return right


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[2:] if argv is None else argv)
