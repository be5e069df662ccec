"""Activation checkpointing of a transformers model's decoder layers, non-reentrant.

transformers wraps each decoder layer (``GradientCheckpointingLayer``) in
``torch.utils.checkpoint.checkpoint``; ``context_fn`` is handed through to it, which is how the
routing context of a forward reaches the recomputation of its layers during backward
(``ContextSlot.checkpoint_contexts``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def set_activation_checkpointing(model: nn.Module, enabled: bool, *, context_fn: Callable | None = None) -> None:
    """Turn checkpointing of ``model``'s layers (a transformers ``PreTrainedModel``) on or off."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing "
                         "(model.gradient_checkpointing: false)")
    if not enabled:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad; this one does not
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers makes the embeddings' output require grad for the reentrant variant's sake; non-reentrant
    # checkpointing does not need it, and it would compute a gradient for every frozen layer's input.
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
