"""What a training step keeps for backward, counted on any device (the CPU included).

``SavedBytes`` counts the tensors autograd saves during a forward
(``torch.autograd.graph.saved_tensors_hooks``), each storage once, parameters left out
(they exist anyway; a *cast copy* of a parameter, what autocast makes of an fp32 weight,
is counted), and attributes them to the decoder layer running when they were saved.
Under activation checkpointing a layer saves nothing itself: what it keeps is its input,
held by the checkpoint for the recomputation; ``SavedBytes`` counts that too, by wrapping
the layers' checkpoint function. The bytes a method's layer observers keep
(``ExpertLayer.observed``) are counted apart.

``replay_structure`` puts a method in the state of a later task without data: the data-free
task hooks for most methods; for those whose structure comes from data (CRAM's slot ranks,
LLaVA-CMoE's grown layers) the largest structure their options allow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from mllm_cl.experts import expert_layers


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers (transformers' ``GradientCheckpointingLayer`` blocks of the language model)."""
    layers = [m for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)
              and ("language_model" in n or ".layers." in n) and "vision" not in n and "visual" not in n]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers decoder layers to count")
    return layers


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


@dataclass
class SavedBytes:
    """Bytes kept for backward during one forward: per decoder layer, and outside them (``rest``)."""

    model: nn.Module
    per_layer: list[int] = field(default_factory=list)
    rest: int = 0
    _seen: set = field(default_factory=set)
    _current: int | None = None

    @contextlib.contextmanager
    def count(self) -> Iterator[SavedBytes]:
        layers = decoder_layers(self.model)
        self.per_layer = [0] * len(layers)
        params = {_storage_key(p) for p in self.model.parameters()}
        handles, wrapped = [], []

        def enter(i):
            def hook(*_):
                self._current = i
            return hook

        def leave(*_):
            self._current = None

        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(enter(i)))
            handles.append(layer.register_forward_hook(leave))
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if func is not None:  # the checkpoint keeps the layer's tensor arguments for the recomputation
                wrapped.append((layer, func))

                def kept_inputs(function, *args, _func=func, _i=i, **kwargs):
                    for a in args:
                        if isinstance(a, torch.Tensor):
                            self._add(a, _i, params)
                    return _func(function, *args, **kwargs)

                layer._gradient_checkpointing_func = kept_inputs

        def pack(t: torch.Tensor):
            self._add(t, self._current, params)
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()
            for layer, func in wrapped:
                layer._gradient_checkpointing_func = func

    def _add(self, t: torch.Tensor, layer: int | None, params: set) -> None:
        key = _storage_key(t)
        if key in params or key in self._seen or t.device.type == "meta":
            return
        self._seen.add(key)
        if layer is None:
            self.rest += key[1]
        else:
            self.per_layer[layer] += key[1]


def observed_bytes(model: nn.Module) -> int:
    """Bytes the layers' observers keep from the last training forward (a method's statistics inputs)."""
    total = 0
    for layer in expert_layers(model).values():
        for value in layer.observed.values():
            tensors = value.values() if isinstance(value, dict) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def replay_structure(method, model: nn.Module, finished: int, *, feature_dim: int, task_end: bool = True) -> None:
    """``method`` with ``finished`` tasks done, without data (the resume path's replay). CRAM gets one
    group whose every slot has ``r_max`` in every layer, LLaVA-CMoE a new expert in every layer for
    every task: the largest structures their options allow. ``feature_dim``: their routing features'
    width (a LLaVA-7B prompt feature: 4096). ``task_end=False`` skips ``on_task_end`` (SAME's takes a
    covariance snapshot, which the ``meta`` device cannot compute; it adds no structure)."""
    largest_structure(method, model, finished, feature_dim=feature_dim)
    for t in range(finished):
        method.on_task_start(model, t)
        if task_end:
            method.on_task_end(model, t)


def largest_structure(method, model: nn.Module, last: int, *, feature_dim: int) -> None:
    """What CRAM and LLaVA-CMoE decide from data, set for tasks 0..``last`` to the largest their options
    allow (every CRAM slot at ``r_max`` in one group; a new CMoE expert in every layer every task)."""
    layers = list(expert_layers(model))
    name = type(method).__name__
    if name == "CRAM":
        method.slots = {t: {"group": 0, "ranks": {n: method.r_max for n in layers}} for t in range(last + 1)}
        method.prototypes = [torch.zeros(feature_dim)]
        method.prototype_counts = [1.0]
    elif name == "LLaVACMoE":
        method.grown = {t: layers for t in range(last + 1)}
        if last:
            method.locator.grow_to(last, feature_dim)


def peak_bytes(*, base_bytes: int, adapter_bytes: int, trained_bytes: int, tokens: int, layers: int,
               layer_bytes_per_token: float, head_bytes_per_token: float, observed_per_layer: int = 0) -> float:
    """Estimated peak bytes on one GPU: the frozen base and the adapters and state (``adapter_bytes``),
    fp32 gradient and AdamW's two moments of what trains (3 x ``trained_bytes``), and the activations
    of ``tokens`` tokens in flight: ``layers`` x the bytes a layer keeps per token, plus the head's."""
    activations = tokens * (layers * layer_bytes_per_token + head_bytes_per_token)
    return base_bytes + adapter_bytes + 3 * trained_bytes + activations + observed_per_layer * layers
