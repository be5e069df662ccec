"""What a router returns, and the per-forward routing context.

``Routing`` is the single currency between routers and expert layers. Its
leading dimensions say the routing level: ``(B, L)`` routes every token,
``(B, 1)`` every sample (sequence-, centroid-, task-level), ``(1, 1)`` the whole
batch. The expert layer broadcasts them against its input.

The ``RoutingContext`` carries per-sample signals (task ids, image and
instruction embeddings, a per-sample router choice) to every expert layer of
one model for the duration of one forward, without touching the HF model's
``forward`` signature (PEFT's Poly tuner solves the same problem with
temporary pre-hooks; a shared slot is simpler and survives ``generate``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch


def index_on(device: torch.device | str, values: Sequence[int]) -> torch.Tensor:
    """``values`` (host integers) as a long tensor made on ``device`` by fills and ranges, one per run of
    equal or consecutive values: no host-to-device copy, which from pageable memory would make the host
    wait for the device like a read-back does."""
    values = [int(v) for v in values]
    parts, start = [], 0
    while start < len(values):
        end, v = start + 1, values[start]
        if end < len(values) and values[end] == v + 1:
            while end < len(values) and values[end] == values[end - 1] + 1:
                end += 1
            parts.append(torch.arange(v, v + end - start, device=device))
        else:
            while end < len(values) and values[end] == v:
                end += 1
            parts.append(torch.full((end - start,), v, dtype=torch.long, device=device))
        start = end
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class Routing:
    """Weights over a router's experts.

    weights: (*lead, k) mixing weights.
    indices: (*lead, k) long positions into the router's ``expert_names``;
        ``-1`` is the null expert (routes to no adapter). ``None`` means dense:
        ``k == len(expert_names)`` and column ``i`` is expert ``i``.
    probs: optional (*lead, E) full router distribution before any top-k
        selection, kept for auxiliary losses (load balancing); E + 1 columns
        (the null expert last) for a router with a null expert.
    active: the positions (ascending) of the only experts that can get a nonzero weight,
        known on the host without reading the weights (a fixed expert, the unmasked experts,
        the experts of the batch's task ids); the expert layer then computes those alone.
        ``None``: decided by the weights on the device (top-k, dense routing).
    """

    weights: torch.Tensor
    indices: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    active: tuple[int, ...] | None = None

    def dense(self, num_experts: int) -> torch.Tensor:
        """Weights scattered to (*lead, num_experts); null-expert mass is dropped."""
        if self.indices is None:
            if self.weights.shape[-1] != num_experts:
                raise ValueError(
                    f"dense routing has {self.weights.shape[-1]} columns for {num_experts} experts"
                )
            return self.weights
        lead = self.weights.shape[:-1]
        out = self.weights.new_zeros(*lead, num_experts + 1)
        # Null expert (-1) goes to the extra last column, then is cut off.
        idx = torch.where(self.indices < 0, num_experts, self.indices)
        out = out.scatter_add(-1, idx, self.weights)
        return out[..., :num_experts]


@dataclass
class RoutingContext:
    """Per-sample signals for one forward. Every field is optional.

    task_ids: (B,) long, the task each sample belongs to (task-level routing,
        the ``individual`` baseline, evaluation with the true task id).
    image_embeds: (B, D) one embedding per sample (centroid routing).
    instruction_embeds: (B, D) instruction-only text embedding per sample.
    router_choice: B router names, one per sample (a mixed batch where each
        sample is routed by the router of the task it was located to).
    token_mask: (B, L) 1 for real tokens, 0 for padding: routers that pool over
        the sequence must ignore padding, or a sample's weights would depend on
        how long its batch neighbours are.
    disable_adapters: run the frozen base model alone (features "from the base").
    extra: method-specific per-sample signals (first dimension B: ``subset``
        selects their rows); keep tables that are not per sample elsewhere.
    cache: per-layer state kept while the context is active, e.g. routing
        computed from the prompt at prefill and reused while decoding.

    Expert layers read nothing back from the device per layer: what routing needs on the host
    (``host_list``: the task ids, a per-sample count) is fetched once per context and kept,
    and index tensors made from host values (``device_index``, ``router_rows``) are made once
    per context and shared by every layer.
    """

    task_ids: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    instruction_embeds: torch.Tensor | None = None
    router_choice: Sequence[str] | None = None
    token_mask: torch.Tensor | None = None
    disable_adapters: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    # Host copies of per-sample signals (``host_list``); a subset's come from its parent's by row.
    host_lists: dict[str, list] = field(default_factory=dict, init=False, repr=False, compare=False)
    _parent: tuple[RoutingContext, list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def host_list(self, name: str) -> list:
        """``task_ids`` or ``extra[name]`` (a 1-D tensor) as a Python list, for routing decisions made on
        the host (which expert a task id names, a bad value refused by name). Fetched from the device
        once per context, the one host round trip of the forward for it, not once per layer; a method
        that made the tensor from a list may put the list in ``host_lists`` first (no round trip)."""
        if name not in self.host_lists:
            if self._parent is not None:
                parent, pick = self._parent
                values = parent.host_list(name)
                self.host_lists[name] = [values[i] for i in pick]
            else:
                value = self.task_ids if name == "task_ids" else self.extra.get(name)
                if value is None:
                    raise KeyError(f"the routing context has no {name!r}")
                self.host_lists[name] = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        return self.host_lists[name]

    def device_index(self, values: Sequence[int], device: torch.device) -> torch.Tensor:
        """``values`` as a long tensor on ``device``, made once per context (kept in ``cache``) and shared
        by every layer that asks for the same values."""
        key = ("device_index", tuple(values), str(device))
        if key not in self.cache:
            self.cache[key] = index_on(device, values)
        return self.cache[key]

    def router_rows(self, device: torch.device) -> dict[str, tuple[list[int], torch.Tensor]]:
        """Per router named in ``router_choice`` (first-seen order): its samples, as a list and as an index
        tensor on ``device``, made once per context."""
        choice = tuple(self.router_choice)
        key = ("router_rows", choice, str(device))
        if key not in self.cache:
            rows = {name: [b for b, c in enumerate(choice) if c == name] for name in dict.fromkeys(choice)}
            self.cache[key] = {name: (pick, self.device_index(pick, device)) for name, pick in rows.items()}
        return self.cache[key]

    def subset(self, rows: torch.Tensor, pick: Sequence[int] | None = None) -> RoutingContext:
        """The context restricted to the samples ``rows`` (a 1-D index tensor); ``pick``: the same rows
        as a list, when the caller has them (otherwise read from ``rows``)."""
        pick = rows.tolist() if pick is None else list(pick)

        def take(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.index_select(0, rows.to(v.device))
            if isinstance(v, (list, tuple)):
                return [v[i] for i in pick]
            return v

        sub = replace(
            self,
            task_ids=take(self.task_ids),
            image_embeds=take(self.image_embeds),
            instruction_embeds=take(self.instruction_embeds),
            router_choice=take(self.router_choice),
            token_mask=take(self.token_mask),
            extra={k: take(v) for k, v in self.extra.items()},
            # Shared with the full context: a router keeps its prefill weights for its
            # own samples across decoding steps (keys are per router).
            cache=self.cache,
        )
        sub._parent = (self, pick)
        return sub

    def require(self, name: str, who: str) -> Any:
        value = getattr(self, name, None)
        if value is None:
            raise ValueError(
                f"{who} needs `{name}` in the routing context; wrap the forward in "
                f"`routing_context(model, {name}=...)`"
            )
        return value


class ContextSlot:
    """Holds the active context; all expert layers of one model share one slot.

    Under activation checkpointing a block's forward runs again during backward, after the
    ``with routing_context(...)`` block has closed. ``checkpoint_contexts`` is the
    ``context_fn`` of ``torch.utils.checkpoint``: it captures the context of the original
    forward and puts it back for the recomputation, marked ``recomputing`` so that the
    layers take no statistics and keep no routing a second time.
    """

    def __init__(self) -> None:
        self.current: RoutingContext | None = None
        self.recomputing = False
        # The layers whose experts' use since the last optimizer step is only known on the device
        # (``ExpertLayer.drop_unrouted_gradients`` reads all of them back at once).
        self.routed: dict[int, Any] = {}

    @contextlib.contextmanager
    def use(self, context: RoutingContext | None, *, recomputing: bool = False) -> Iterator[RoutingContext | None]:
        previous = self.current, self.recomputing
        self.current, self.recomputing = context, recomputing
        try:
            yield context
        finally:
            self.current, self.recomputing = previous

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """(forward, recomputation) context managers for one checkpointed block, called at its forward."""
        return contextlib.nullcontext(), self.use(self.current, recomputing=True)
