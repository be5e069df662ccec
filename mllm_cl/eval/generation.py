"""Batched greedy decoding with a KV cache, for evaluation.

One prefill over the left-padded prompts (image features merged in), then
one token per step for the whole batch. Position ids come from the attention
mask, so a prompt's tokens sit at the same positions whatever its padding,
and a finished sequence keeps decoding padding until the batch is done.

Routers that route on the whole input (sequence-, centroid-, task-level)
compute their weights during the prefill and keep them while decoding: the
routing context says which step it is (``context.cache["decoding"]``) and
keeps what a router stored at prefill in ``context.cache``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from mllm_cl.experts import RoutingContext, routing_context


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    context: RoutingContext | None = None,
    model_inputs: dict | None = None,
) -> torch.Tensor:
    """(B, L) left-padded prompts -> (B, <= max_new_tokens) new tokens (pad after EOS).

    ``model`` is any backbone of ``mllm_cl.backbones`` (its forward takes the prompt with
    ``pixel_values``, the KV cache as ``cache`` (``backbones.kv_cache``) and 1-D position ids); ``model_inputs``
    are the batch's backbone-specific inputs (``batch["model_inputs"]``), used at prefill only."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = context or RoutingContext()
    context.cache["decoding"] = False
    mask = attention_mask.long()
    context.token_mask = mask  # the prompt's real tokens (whole-input routers pool over these)
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    cache = DynamicCache()
    with routing_context(model, context):
        out = model(input_ids, attention_mask=mask, pixel_values=pixel_values, position_ids=position,
                    cache=cache, use_cache=True, logits_to_keep=1, **(model_inputs or {}))
        next_token = out.logits[:, -1].argmax(-1)  # (B,)
        done = torch.zeros_like(next_token, dtype=torch.bool)
        last = position[:, -1]
        tokens = []
        context.cache["decoding"] = True
        for step in range(max_new_tokens):
            next_token = next_token.masked_fill(done, pad_token_id)
            tokens.append(next_token)
            done |= next_token == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            last = last + 1
            out = model(next_token[:, None], attention_mask=mask, position_ids=last[:, None],
                        cache=cache, use_cache=True, logits_to_keep=1)
            next_token = out.logits[:, -1].argmax(-1)
    return torch.stack(tokens, dim=1)
