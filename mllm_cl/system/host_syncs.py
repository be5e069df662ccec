"""Host round trips: the calls that make the CPU wait for the device, counted on any device.

On a GPU the host queues kernels and runs ahead of them; a call that needs a value computed on the
device (``.item()``, ``.tolist()``, ``nonzero()``, ``if mask.any():``, a boolean-mask index, an
output whose size depends on the data) or that copies a Python list onto it (``torch.tensor([...],
device=...)``) blocks the host until the device has caught up. One of them per adapted module turns
a forward of a 32-layer model into a few hundred stalls.

``count_host_syncs()`` counts them in the CPU's own run of the same code: every call of the kinds
below made inside the ``with`` block, by kind and by the line that made it (the innermost frame
outside torch), optionally split per forward of one module (``per_call``). On the CPU nothing
actually waits; the count says what would on a GPU. There, ``torch.cuda.set_sync_debug_mode("error")``
is the equivalent check: CUDA raises at the first synchronizing call.

Kinds:

- ``item``: ``Tensor.item``, ``int(t)``, ``float(t)``, ``operator.index(t)``, ``torch.equal``, ``allclose``;
- ``tolist``: ``Tensor.tolist``;
- ``nonzero``: ``nonzero`` / ``argwhere`` (``torch.where(mask)`` with one argument included);
- ``bool``: ``Tensor.__bool__`` (``if t:``, ``if mask.any():``, ``and`` / ``or`` / ``not`` of a tensor);
- ``cpu``: ``Tensor.cpu``, ``Tensor.numpy``;
- ``tensor``: ``torch.tensor`` / ``torch.as_tensor`` / ``Tensor.new_tensor`` of a non-empty Python list or
  tuple, or of a number given a device (``new_tensor`` always has one), and indexing with a Python list
  (``t[..., [0, 2]]``): a host-to-device copy from pageable memory on a GPU (lists are counted whatever
  the device);
- ``mask_index``: indexing or assigning with a boolean tensor, ``masked_select`` (a ``nonzero`` inside);
- ``shape``: outputs whose size depends on values: ``unique``, ``bincount``, ``repeat_interleave``
  with a tensor of repeats and no ``output_size``.

Nested counted calls (a counted call made inside another, e.g. ``Tensor.unique`` calling
``torch.unique``) count once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mllm_cl.data.collate import supervised_positions
from mllm_cl.eval.generation import greedy_generate
from mllm_cl.experts import ExpertSetup, expert_layers
from mllm_cl.methods import CRAM, SAME, Individual, LLaVACMoE, LoRAFineTune, MoELoRA, RoutingCL
from mllm_cl.methods.locator import prompt_features
from mllm_cl.system.module import ContinualMLLM

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))


@dataclass(eq=False)  # compared by identity: the counters of a block and of its calls may hold equal counts
class HostSyncs:
    """Counted host round trips: by kind, by call site ``(kind, path, line, function)`` (the path relative
    to the repository where it is inside it), and per forward of ``per_call``'s module (``calls``)."""

    kinds: Counter = field(default_factory=Counter)
    sites: Counter = field(default_factory=Counter)
    calls: list[HostSyncs] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def add(self, kind: str, site: tuple[str, int, str]) -> None:
        self.kinds[kind] += 1
        self.sites[(kind, *site)] += 1

    def places(self) -> Counter:
        """Counts by ``(kind, path, function)``: the sites without their line numbers."""
        out = Counter()
        for (kind, path, _, function), n in self.sites.items():
            out[(kind, path, function)] += n
        return out

    def lines(self) -> list[str]:
        """One line per call site, the most frequent first."""
        return [f"{n:4d} {kind:10s} {path}:{line} ({function})"
                for (kind, path, line, function), n in self.sites.most_common()]

    def __str__(self) -> str:
        return "\n".join([f"{self.total} host syncs" + (f": {dict(self.kinds)}" if self.total else "")]
                         + [f"  {line}" for line in self.lines()])


class _State(threading.local):
    def __init__(self) -> None:
        self.depth = 0  # inside a counted call: nested ones are not counted again
        self.targets: list[HostSyncs] = []


_state = _State()
_lock = threading.Lock()
_active = 0


def _site() -> tuple[str, int, str]:
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(_TORCH_DIR):
            shown = os.path.relpath(path, _ROOT) if path.startswith(_ROOT + os.sep) else path
            return shown, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back
    return "?", 0, "?"


def _record(kind: str) -> None:
    if _state.targets:
        site = _site()
        for target in _state.targets:
            target.add(kind, site)


def _wrap(original: Callable, kind: str | Callable[..., str | None]) -> Callable:
    """``original`` counted as ``kind`` (or as what ``kind(*args, **kwargs)`` names; ``None``: not counted)."""

    def counted(*args, **kwargs):
        if _state.depth == 0 and _state.targets:
            name = kind if isinstance(kind, str) else kind(*args, **kwargs)
            if name is not None:
                _record(name)
        _state.depth += 1
        try:
            return original(*args, **kwargs)
        finally:
            _state.depth -= 1

    counted.__wrapped__ = original
    return counted


def _from_python(data: Any, *args, **kwargs) -> str | None:
    if isinstance(data, (list, tuple)):
        return "tensor" if len(data) else None  # an empty one copies nothing
    scalar = isinstance(data, (int, float, bool)) and not isinstance(data, torch.Tensor)
    return "tensor" if scalar and kwargs.get("device") is not None else None  # a number put on a device


def _new_tensor(self, data: Any, *args, **kwargs) -> str | None:
    return _from_python(data, device=self.device)


def _is_mask(index: Any) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index)
    return False


def _has_list(index: Any) -> bool:
    return isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index))


def _getitem(self, index) -> str | None:
    return "mask_index" if _is_mask(index) else "tensor" if _has_list(index) else None


def _setitem(self, index, value) -> str | None:
    return _getitem(self, index)


def _where(condition, *rest, **kwargs) -> str | None:
    return "nonzero" if not rest and not kwargs else None


def _repeat_interleave(*args, **kwargs) -> str | None:
    repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0] if len(args) == 1 else None)
    with_size = kwargs.get("output_size") is not None or len(args) > 3
    return "shape" if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and not with_size else None


# (owner, attribute, kind): what is wrapped while counting.
_PATCHES: list[tuple[Any, str, Any]] = [
    (torch.Tensor, "item", "item"),
    (torch.Tensor, "__int__", "item"),
    (torch.Tensor, "__float__", "item"),
    (torch.Tensor, "__index__", "item"),
    (torch.Tensor, "equal", "item"),
    (torch.Tensor, "allclose", "item"),
    (torch, "equal", "item"),
    (torch, "allclose", "item"),
    (torch.Tensor, "tolist", "tolist"),
    (torch.Tensor, "nonzero", "nonzero"),
    (torch.Tensor, "argwhere", "nonzero"),
    (torch, "nonzero", "nonzero"),
    (torch, "argwhere", "nonzero"),
    (torch, "where", _where),
    (torch.Tensor, "__bool__", "bool"),
    (torch.Tensor, "cpu", "cpu"),
    (torch.Tensor, "numpy", "cpu"),
    (torch, "tensor", _from_python),
    (torch, "as_tensor", _from_python),
    (torch.Tensor, "new_tensor", _new_tensor),
    (torch.Tensor, "masked_select", "mask_index"),
    (torch, "masked_select", "mask_index"),
    (torch.Tensor, "unique", "shape"),
    (torch, "unique", "shape"),
    (torch, "unique_consecutive", "shape"),
    (torch.Tensor, "bincount", "shape"),
    (torch, "bincount", "shape"),
    (torch.Tensor, "repeat_interleave", _repeat_interleave),
    (torch, "repeat_interleave", _repeat_interleave),
]


_MISSING = object()


class _Indexing(torch.overrides.TorchFunctionMode):
    """Indexing (``t[mask]``, ``t[..., [0, 2]] = v``) counted through torch's function mode: setting
    ``__getitem__`` / ``__setitem__`` on ``torch.Tensor`` itself would leave it with Python's generic
    sequence slots after the original is put back (``torch.tensor([t0, t1])`` of 0-d tensors then fails)."""

    _KINDS = {torch.Tensor.__getitem__: _getitem, torch.Tensor.__setitem__: _setitem}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = self._KINDS.get(func)
        if kind is not None and _state.depth == 0 and _state.targets:
            name = kind(*args)
            if name is not None:
                _record(name)
        return func(*args, **(kwargs or {}))


def _install() -> list[tuple[Any, str, Any]]:
    saved = []
    for owner, name, kind in _PATCHES:
        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))  # inherited: deleted again after
        setattr(owner, name, _wrap(getattr(owner, name), kind))
    return saved


_saved: list[tuple[Any, str, Any]] = []


@contextlib.contextmanager
def count_host_syncs(*, per_call: nn.Module | None = None) -> Iterator[HostSyncs]:
    """Count the host round trips made in the block (see the module docstring for the kinds).

    ``per_call``: also split the count per top-level forward of this module (``HostSyncs.calls``, one
    entry per call, in order), e.g. a generation's prefill and each of its decoding steps.
    """
    global _active, _saved
    syncs = HostSyncs()
    handles = []
    if per_call is not None:
        depth = [0]

        def enter(module, args, kwargs=None):
            if depth[0] == 0:
                syncs.calls.append(HostSyncs())
                _state.targets.append(syncs.calls[-1])
            depth[0] += 1

        def leave(module, args, *rest):
            depth[0] -= 1
            if depth[0] == 0 and syncs.calls and syncs.calls[-1] in _state.targets:
                _state.targets.remove(syncs.calls[-1])

        handles = [per_call.register_forward_pre_hook(enter), per_call.register_forward_hook(leave)]
    with _lock:
        if _active == 0:
            _saved = _install()
        _active += 1
    _state.targets.append(syncs)
    indexing = _Indexing()
    try:
        with indexing:
            yield syncs
    finally:
        _state.targets[:] = [t for t in _state.targets if t is not syncs and t not in syncs.calls]
        for h in handles:
            h.remove()
        with _lock:
            _active -= 1
            if _active == 0:
                for owner, name, original in reversed(_saved):
                    if original is _MISSING:
                        delattr(owner, name)
                    else:
                        setattr(owner, name, original)
                _saved = []


# ------------------------------------------------------------------------ every method's forwards
#: The methods measured by ``method_syncs``: each registered method and its oracle variants (``route_by``).
METHODS = ["lora_ft", "moelora", "individual", "routing", "routing:task_id", "same", "same:task_id", "cram",
           "cram:task_id", "cram:task_slot", "cmoe", "cmoe:task_id"]
#: Four adapted modules per decoder layer (CRAM adapts attention linears).
TARGETS = {"cram": ["q_proj", "k_proj", "v_proj", "o_proj"]}
DEFAULT_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def make_method(name: str):
    """A method as ``configs/methods`` sets it up (``NAME:ROUTE_BY``: its oracle), with one-step
    probe and gate phases and CRAM's tasks in one group, so that two tasks build every router kind."""
    kind, _, route_by = name.partition(":")
    route = {"route_by": route_by} if route_by else {}
    targets = TARGETS.get(kind, DEFAULT_TARGETS)
    if kind == "lora_ft":
        return LoRAFineTune(ExpertSetup(targets, rank=8))
    if kind == "moelora":
        return MoELoRA(ExpertSetup(targets, rank=64), num_experts=8)
    if kind == "individual":
        return Individual(ExpertSetup(targets, rank=8))
    if kind == "routing":
        return RoutingCL(ExpertSetup(targets, rank=8), gate_steps=1, gate_batch=None, **route)
    if kind == "same":
        return SAME(ExpertSetup(targets, rank=8), num_experts=4, **route)
    if kind == "cram":
        return CRAM(ExpertSetup(targets, rank=48), r_min=2, r_max=3, join_cosine=0.0, **route)
    if kind == "cmoe":
        return LLaVACMoE(ExpertSetup(targets, rank=8), probe_steps=1, probe_fraction=1.0, **route)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


def make_batch(model: nn.Module, task_ids: list[int], *, seed: int, answer: int | None = 3, text: int = 6) -> dict:
    """A batch as the collator makes it: image placeholders then text; the last ``answer`` tokens
    are the labels (``None``: a prompt-only evaluation batch)."""
    g = torch.Generator().manual_seed(seed)
    B, image = len(task_ids), model.image_token_id
    ids = torch.randint(10, 200, (B, model.num_image_tokens + text), generator=g)
    ids = ids.masked_fill(ids == image, image + 1)
    ids[:, : model.num_image_tokens] = image
    side = model.image_size
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_mask": ids == image,
             "pixel_values": torch.randn(B, 3, side, side, generator=g), "has_image": torch.ones(B, dtype=torch.bool),
             "instruction": ["What colour is it?"] * B, "task_ids": torch.tensor(task_ids)}
    if answer is not None:
        labels = torch.full_like(ids, -100)
        labels[:, -answer:] = ids[:, -answer:]
        batch.update(labels=labels, loss_positions=supervised_positions(labels))
    return batch


def method_syncs(name: str, layers: int, *, tasks: int = 2, steps: int = 1) -> dict[str, HostSyncs]:
    """Host syncs of ``name``'s forwards (``make_method``) on the tiny random backbone with ``layers``
    decoder layers, after ``tasks`` tasks trained as the continual loop runs them (``steps`` SGD steps
    per phase through ``ContinualMLLM.forward_batch``, the methods' callbacks' work in between).

    Keys: ``train:PHASE`` (the last task's training forward of each phase, the most any of its
    steps made: routing context, forward, loss and the method's extra loss), ``step:PHASE`` (the
    gradient hooks between backward and the optimizer step, ``ContinualMLLM.on_before_optimizer_step``),
    ``context`` (the evaluation routing context of a batch), ``prefill`` and ``decode`` (one forward
    each of a greedy generation with a KV cache; ``decode`` the most of its steps)."""
    torch.manual_seed(0)
    method = make_method(name)
    module = ContinualMLLM(method, backbone_overrides={"llm_layers": layers})
    model = module.model
    out: dict[str, HostSyncs] = {}
    for t in range(tasks):
        model.train()
        method.on_task_start(model, t)
        for phase in method.phases(t, tasks):
            method.on_phase_start(model, t, phase)
            optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.1)
            for s in range(steps):
                batch = make_batch(model, [t] * 4, seed=100 * t + s)
                with count_host_syncs() as syncs:
                    loss, extra = module.forward_batch(batch, training=True)
                if t == tasks - 1:
                    key = f"train:{phase.name}"
                    out[key] = max(out.get(key, syncs), syncs, key=lambda c: c.total)
                (loss if extra is None else loss + extra).backward()
                with count_host_syncs() as step_syncs:
                    module.on_before_optimizer_step(optimizer)
                if t == tasks - 1:
                    key = f"step:{phase.name}"
                    out[key] = max(out.get(key, step_syncs), step_syncs, key=lambda c: c.total)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if isinstance(method, SAME):  # its callback, after the optimizer step
                    method.observe(model)
                if isinstance(method, LLaVACMoE) and method.probing:
                    method.observe_probe_batch(model, batch)
            method.on_phase_end(model, t, phase)
        method.on_task_end(model, t)
        if isinstance(method, LLaVACMoE):  # its locator fitter, at task end
            model.eval()
            method.locator.fit_task(prompt_features(model, make_batch(model, [t] * 4, seed=100 * t, answer=None)))
    model.eval()
    batch = make_batch(model, [1, 0, -1, tasks - 1], seed=999, answer=None)
    with torch.no_grad():
        with count_host_syncs() as out["context"]:
            context = method.routing_context(batch, training=False)
        with count_host_syncs(per_call=model) as generation:
            greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            max_new_tokens=3, eos_token_id=-1, pad_token_id=0, context=context)
    out["prefill"] = generation.calls[0]
    out["decode"] = max(generation.calls[1:], key=lambda c: c.total)
    if len(expert_layers(model)) != 4 * layers:
        raise RuntimeError(f"{name}: {len(expert_layers(model))} adapted modules, expected 4 per layer")
    return out


__all__ = ["HostSyncs", "METHODS", "count_host_syncs", "make_batch", "make_method", "method_syncs"]
