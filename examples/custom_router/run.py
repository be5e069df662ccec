"""Build a tiny MLLM, inject experts routed by the router a YAML file names, run one batch.

    python examples/custom_router/run.py --config examples/custom_router/config.yaml

Prints the injection report and each expert's mean routing weight, and
checks that every token's weights sum to 1.
"""

from __future__ import annotations

import os
import sys

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # makes `cosine_router` importable

from mllm_cl.backbones import PRESETS, build_preset  # noqa: E402
from mllm_cl.experts import ExpertSetup, expert_layers  # noqa: E402


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the options below")
    parser.add_argument("--backbone", type=str, default="tiny-clip-llama", help=f"one of {list(PRESETS)}")
    parser.add_class_arguments(ExpertSetup, "experts")
    cfg = parser.parse_args()
    init = parser.instantiate(cfg)

    backbone = build_preset(cfg.backbone, seed=0)
    model, tok = backbone.model, backbone.tokenizer
    print(init.experts.apply(model))
    n = model.num_image_tokens
    ids = torch.tensor([[tok.bos_token_id] + [tok.image_token_id] * n + tok(" what shape is this?").input_ids] * 2)
    with torch.no_grad():
        model(ids, pixel_values=torch.randn(2, 3, model.image_size, model.image_size))
    for name, layer in expert_layers(model).items():
        router = layer.routers["default"]
        w = layer.last_routing.weights  # (B, L, E)
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1])), "routing weights must sum to 1"
        means = ", ".join(f"{e}={v:.2f}" for e, v in zip(router.expert_names, w.mean((0, 1)).tolist(), strict=False))
        print(f"{name}: {type(router).__name__} -> {means}")


if __name__ == "__main__":
    main()
