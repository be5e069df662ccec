"""Evaluation generation speed: our batched greedy decoding / transformers' generate.

Same tiny model, same left-padded batch of image prompts, the same number of
new tokens (EOS never ends a sequence early in either), interleaved rounds,
median of per-round ratios of tokens/s with the 10-90% spread. Target >= 1.0.

    python benchmarks/generation.py [--rounds 15] [--batch 32] [--new-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, ratio_line  # noqa: E402

from mllm_cl.backbones import build_preset  # noqa: E402
from mllm_cl.eval.generation import greedy_generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs both variants once)")
    ap.add_argument("--batch", type=int, default=32, help="prompts per batch")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--preset", default="tiny-clip-llama", help="backbone preset")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backbone = build_preset(args.preset, seed=0)
    model, tok = backbone.model, backbone.tokenizer
    model.eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.batch):  # prompts of different lengths: real left padding
        words = " what is shown here" + " please" * (i % 4)
        rows.append([tok.bos_token_id] + [tok.image_token_id] * model.num_image_tokens + tok(words).input_ids)
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (ids != tok.pad_token_id).long()
    pixels = torch.randn(args.batch, 3, model.image_size, model.image_size, generator=g)
    n = args.new_tokens

    def ours():
        out = greedy_generate(model, ids, mask, pixels, max_new_tokens=n, eos_token_id=-1,
                              pad_token_id=tok.pad_token_id)
        assert out.shape == (args.batch, n)

    def hf():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape == (args.batch, n)

    times = interleaved({"ours": ours, "hf": hf}, rounds=args.rounds)
    tokens = args.batch * n
    print(f"torch {torch.__version__}, threads {args.threads}, {args.rounds} rounds, {args.preset}, "
          f"batch {args.batch}, {n} new tokens, prompt {width} tokens")
    # tokens/s ratio = inverse time ratio
    print(ratio_line("tokens/s: ours / transformers generate", times["hf"], times["ours"]))
    print(f"ours {tokens / sorted(times['ours'])[len(times['ours']) // 2]:.0f} tokens/s")


if __name__ == "__main__":
    main()
