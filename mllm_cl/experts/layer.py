"""ExpertLayer: a frozen ``nn.Linear`` plus a named pool of LoRA experts mixed by a router.

``y = W0 x + sum_k w_k * scale_k * B_k A_k x`` with ``w`` from the active router.

Compute paths:

- token-level sparse routing over a large pool (top-k << pool) dispatches: the
  (token, slot) pairs are sorted by expert once and every expert runs on its
  contiguous chunk in one grouped matmul (``grouped_mm``), results added back.
  Where the grouped matmul is unavailable, the pool runs as one concatenated LoRA
  with zero weights off the routed slots.
- dense routing (softmax over all experts, MoELoRA) and per-sample / per-batch
  routing concatenate the experts into one rank-sum LoRA: two matmuls whatever
  the number of experts. A router that knows on the host which experts can get
  weight (``Routing.active``: a fixed expert, the unmasked ones, the batch's task
  experts) has only those concatenated.

Nothing in a forward reads the routing back to the host: which experts were
chosen, how many tokens each got and their ranks stay on the device (on a GPU a
read-back per adapted module stalls the host a few hundred times per forward).
An expert that gets no weight must still get no gradient at all (a zero
gradient would let AdamW's decay and momentum move it): where only the weights
tell (top-k routing), the layer notes on the device which experts got weight,
and ``drop_unrouted_gradients`` (run by ``apply_gradient_transforms`` before the
optimizer step) reads the notes of every layer back at once and drops the
gradients of the experts that got none.

Experts are separate parameters (one ``LoRAExpert`` each), so a loop over
them never indexes a stacked parameter (``A[e]`` would make backward allocate
a full-size gradient per slice).

Pure ``nn.Module``: no Lightning import.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.distributed import all_reduce_sum
from mllm_cl.experts.lora import LoRAExpert, adapter_input
from mllm_cl.experts.routers import Router
from mllm_cl.experts.routing import ContextSlot, Routing, RoutingContext, index_on

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
GradientTransform = Callable[["ExpertLayer"], None]
#: ``fn(x, routing, context) -> tensor`` (or ``None``): what a method needs from a training forward's input,
#: computed there, detached and small (a few rows, a per-sample mean), so no layer input outlives its forward.
Observer = Callable[[torch.Tensor, "Routing | None", "RoutingContext | None"], "torch.Tensor | dict | None"]


class _Handle:
    def __init__(self, items: list, item: object) -> None:
        self._items, self._item = items, item

    def remove(self) -> None:
        if self._item in self._items:
            self._items.remove(self._item)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r} must match {_NAME.pattern} (it becomes a state-dict key)")


class ExpertLayer(nn.Module):
    """Wraps ``base_layer`` (kept, never copied, frozen) with a pool of LoRA experts.

    Args:
        base_layer: the linear layer to adapt; its parameters are frozen.
        router: routes over the pool; optional while the layer holds at most
            one expert (that expert then gets weight 1).
        rank: default rank of experts added without an explicit rank.
        alpha: default LoRA alpha (``None``: 2 * rank, i.e. scale 2).
        dropout: dropout on the expert input (as PEFT's ``lora_dropout``).
        expert_dtype: dtype of experts added later (``None``: the base weight's dtype), e.g.
            float32 adapters over a bfloat16 base; inputs are cast to it and the delta back.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        router: Router | None = None,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        expert_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"ExpertLayer wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.experts = nn.ModuleDict()
        self.routers = nn.ModuleDict()
        if router is not None:
            self.add_router("default", router)
        self.active_router = "default"
        self.rank = rank
        self.alpha = alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.expert_dtype = expert_dtype
        self.slot: ContextSlot | None = None  # shared with the model's other expert layers
        self.last_routing: Routing | None = None  # for auxiliary losses of this step
        self._observers: dict[str, Observer] = {}
        self.observed: dict[str, object] = {}  # each observer's result for the last training forward
        # When a list: every routing of a forward is appended as (rows or None, expert names, Routing),
        # rows the samples a per-sample router choice gave that router (the routing diagnostic).
        self.record: list | None = None
        self._grad_transforms: list[GradientTransform] = []
        # Since the last optimizer step: per routed name list, which experts got weight where only the
        # device knew (OR over forwards), and the experts a host-known routing sent weight to.
        self._routed: dict[tuple[str, ...], torch.Tensor] = {}
        self._routed_names: set[str] = set()
        self._index_cache: dict[tuple, torch.Tensor] = {}  # rank-expansion index tensors, by pool and device

    # ------------------------------------------------------------------ pool
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts.keys())

    def add_expert(
        self,
        name: str,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        init_from: str | None = None,
        routers: Iterable[str] | None = None,
    ) -> LoRAExpert:
        """Add a trainable expert and register it with ``routers`` (default: all).

        ``init_from`` copies the weights of an existing expert (same rank).
        The layer's ``alpha`` applies at the layer's rank; an expert of another
        rank without an explicit ``alpha`` keeps the default scale (alpha = 2r).
        """
        _check_name("expert", name)
        if name in self.experts:
            raise ValueError(f"expert {name!r} already exists; experts: {self.expert_names}")
        unknown = [r for r in (routers or []) if r not in self.routers]
        if unknown:  # checked first, so a typo leaves the layer unchanged
            raise KeyError(f"no router named {unknown}; routers: {list(self.routers)}")
        rank = self.rank if rank is None else rank
        weight = self.base_layer.weight
        expert = LoRAExpert(
            self.in_features,
            self.out_features,
            rank,
            alpha=self.alpha if alpha is None and rank == self.rank else alpha,
            device=weight.device,
            dtype=self.expert_dtype or (weight.dtype if weight.is_floating_point() else None),
        )
        if init_from is not None:
            source = self.experts[init_from]
            if source.rank != rank:
                raise ValueError(f"cannot copy expert {init_from!r} of rank {source.rank} into rank {rank}")
            expert.load_state_dict(source.state_dict())
        self.experts[name] = expert
        for r in self.routers if routers is None else routers:
            self.routers[r].add_expert(name)
        return expert

    def remove_expert(self, name: str) -> None:
        del self.experts[name]
        for router in self.routers.values():
            if name in router.expert_names:
                router.remove_expert(name)

    def freeze_expert(self, name: str, frozen: bool = True) -> None:
        """Freeze (or unfreeze) an expert and its per-expert router parameters."""
        self.experts[name].requires_grad_(not frozen)
        for router in self.routers.values():
            if name in router.expert_names:
                router.freeze_expert(name, frozen)

    def unfreeze_expert(self, name: str) -> None:
        self.freeze_expert(name, frozen=False)

    def add_router(self, name: str, router: Router, *, experts: Iterable[str] = ()) -> Router:
        """Add ``router`` under ``name``, on the layer's device, routing over ``experts``
        (existing expert names, in that order; more can be added to it later)."""
        _check_name("router", name)
        if router.in_features != self.in_features:
            raise ValueError(f"router in_features {router.in_features} != layer in_features {self.in_features}")
        experts = list(experts)
        unknown = [e for e in experts if e not in self.experts]
        if unknown:
            raise KeyError(f"router {name!r}: no experts {unknown}; experts: {self.expert_names}")
        router.to(self.base_layer.weight.device)
        for expert in experts:
            router.add_expert(expert)
        self.routers[name] = router
        return router

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per expert (``expert:NAME``) and per router (``router:NAME``)."""
        counts = {f"expert:{n}": sum(p.numel() for p in e.parameters()) for n, e in self.experts.items()}
        counts.update({f"router:{n}": sum(p.numel() for p in r.parameters()) for n, r in self.routers.items()})
        return counts

    # ---------------------------------------------------------- gradient hooks
    def register_gradient_transform(self, fn: GradientTransform) -> _Handle:
        """``fn(layer)`` rewrites the ``.grad`` of this layer's experts/routers in place.

        Called by ``apply_gradient_transforms`` between backward and the
        optimizer step (a callback's ``on_before_optimizer_step``), where all
        gradients of the layer exist together (SAME's router rewrite needs the
        whole E x d_in gradient, not one row at a time).
        """
        self._grad_transforms.append(fn)
        return _Handle(self._grad_transforms, fn)

    def apply_gradient_transforms(self) -> None:
        """``drop_unrouted_gradients``, then every registered transform, in order."""
        self.drop_unrouted_gradients()
        for fn in self._grad_transforms:
            fn(self)

    def drop_unrouted_gradients(self) -> None:
        """Experts that got no routing weight in any training forward since the last call keep no gradient
        (``.grad`` is set to ``None``), where the forward could not tell on the host (top-k routing).

        The first call after a step reads back the notes of every layer of the model at once (the layers
        share the context slot): one host round trip per optimizer step, none in the forwards. Under
        ``ddp`` an expert keeps its gradient when any process routed to it (its gradient is their sum)."""
        pending = dict(self.slot.routed) if self.slot is not None else {}
        if self._routed:
            pending[id(self)] = self
        if self.slot is not None:
            self.slot.routed.clear()
        if not pending:
            self._routed_names = set()
            return
        _drop_unrouted(list(pending.values()))

    # -------------------------------------------------------------- observers
    def register_observer(self, name: str, fn: Observer) -> None:
        """``fn(x.detach(), routing, context)`` runs in every training forward of this layer, once:
        not in an activation-checkpointing recomputation, not in evaluation. Its result is
        ``observed[name]`` until the next training forward. Methods take their statistics here
        instead of keeping the layer's input alive until after backward."""
        self._observers[name] = fn

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        context = self.slot.current if self.slot is not None else None
        if not self.experts or (context is not None and context.disable_adapters):
            return out
        if context is not None and context.router_choice is not None:
            delta = self._mixed_router_delta(x, context)  # names are checked even with one router
        else:
            delta = self._delta(x, self._router(self.active_router), context)
        if self._observers and self.training and not self._recomputing():
            with torch.no_grad():
                x_ = x.detach()
                self.observed = {n: fn(x_, self.last_routing, context) for n, fn in self._observers.items()}
        return out + delta.to(out.dtype)

    def _recomputing(self) -> bool:
        return self.slot is not None and self.slot.recomputing

    def _router(self, name: str) -> Router | None:
        if name in self.routers:
            return self.routers[name]
        if not self.routers and len(self.experts) == 1:
            return None
        raise RuntimeError(
            f"ExpertLayer has {len(self.experts)} experts and no router named {name!r} "
            f"(routers: {list(self.routers)})"
        )

    def _mixed_router_delta(self, x: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        """Each sample uses the router ``context.router_choice[b]`` names."""
        if len(context.router_choice) != x.shape[0]:
            raise ValueError(f"router_choice has {len(context.router_choice)} entries for a batch of {x.shape[0]}")
        delta = x.new_zeros(*x.shape[:-1], self.out_features)
        # Distinct routers, first-seen order; their rows' index tensors are made once per context.
        for name, (pick, rows) in context.router_rows(x.device).items():
            if name not in self.routers:
                raise ValueError(f"router_choice names router {name!r}; this layer has {list(self.routers)}")
            part = self._delta(x.index_select(0, rows), self.routers[name], context.subset(rows, pick), rows=rows)
            delta = delta.index_copy(0, rows, part.to(delta.dtype))
        return delta

    # Dispatch (gather, grouped matmul, scatter) costs about this many times the
    # matmuls of its k active experts; below that, one concatenated LoRA over the
    # whole pool with zero weights for unrouted experts is cheaper. Measured with
    # benchmarks/expert_layer.py on 2 CPU threads.
    dispatch_overhead: float = 4.0

    def _dispatch_pays(self, routing: Routing, experts: list[LoRAExpert]) -> bool:
        k = routing.indices.shape[-1]
        ranks = [e.rank for e in experts]
        return sum(ranks) > self.dispatch_overhead * k * max(ranks)

    def _delta(self, x: torch.Tensor, router: Router | None, context: RoutingContext | None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        if router is None:  # a lone expert, weight 1: exactly PEFT's LoRA
            (expert,) = self.experts.values()
            self._keep(rows, self.expert_names, None)
            return expert(self.dropout(x))
        names = list(router.expert_names)
        experts = [self.experts[n] for n in names]
        routing = router(x, context)
        self._keep(rows, names, routing)
        if torch.is_grad_enabled() and not self._recomputing() and any(
                p.requires_grad for e in experts for p in e.parameters()):
            self._note_routed(names, routing)
        lead = x.shape[:-1]
        token_level = routing.weights.shape[:-1] == lead
        if (routing.active is None and routing.indices is not None and token_level
                and self._dispatch_pays(routing, experts)):
            return _dispatch(self.dropout(x), routing, experts, self.out_features, self._expansion)
        return _mix(self.dropout(x), routing, experts, self.out_features, self._expansion)

    def _note_routed(self, names: list[str], routing: Routing) -> None:
        """Which of ``names`` got weight in this training forward, for ``drop_unrouted_gradients``: the
        host-known ones by name, the others as a device flag per expert (never read back here)."""
        if routing.active is not None or routing.indices is None:  # the host knows; dense: every expert
            self._routed_names.update(names if routing.active is None else [names[i] for i in routing.active])
            return
        with torch.no_grad():  # nothing saved for backward (a checkpoint's recomputation notes nothing)
            used = routing.dense(len(names)).ne(0).reshape(-1, len(names)).any(0)  # (E,) on the device
        key = tuple(names)
        self._routed[key] = used if key not in self._routed else self._routed[key] | used
        if self.slot is not None:
            self.slot.routed[id(self)] = self

    def _expansion(self, positions: tuple[int, ...], ranks: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``_expand_index``, made once per pool and device and kept."""
        key = (positions, ranks, str(device))
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) >= 64:  # pools change between tasks: the old ones go
                self._index_cache.clear()
            index = self._index_cache[key] = _expand_index(positions, ranks, device)
        return index

    def _keep(self, rows: torch.Tensor | None, names: list[str], routing: Routing | None) -> None:
        """The routing of this forward, for auxiliary losses and the routing diagnostic; a
        checkpoint's recomputation keeps nothing (the original forward's routing is the one in use)."""
        if self._recomputing():
            return
        self.last_routing = routing
        if self.record is not None:
            self.record.append((rows, names, routing))


def _drop_unrouted(layers: list[ExpertLayer]) -> None:
    """``ExpertLayer.drop_unrouted_gradients`` for ``layers`` together: one read-back of all their notes."""
    records = [(layer, names, used) for layer in layers for names, used in layer._routed.items()]
    flags = []
    if records:
        flags = torch.cat([used for _, _, used in records]).to(torch.int32)
        flags = all_reduce_sum(flags).tolist()  # every process's routing; the one host round trip of a step
    named = {id(layer): set() for layer in layers}
    used = {id(layer): set(layer._routed_names) for layer in layers}
    start = 0
    for layer, names, _ in records:
        named[id(layer)].update(names)
        used[id(layer)].update(n for n, f in zip(names, flags[start:start + len(names)], strict=False) if f)
        start += len(names)
    for layer in layers:
        for name in named[id(layer)] - used[id(layer)]:
            if name in layer.experts:
                for p in layer.experts[name].parameters():
                    p.grad = None
        layer._routed, layer._routed_names = {}, set()


def _expand_index(positions: tuple[int, ...], ranks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(sum of ranks,) the routing-weight column of each rank row of the concatenated experts ``positions``."""
    return index_on(device, [p for p, r in zip(positions, ranks, strict=False) for _ in range(r)])


def _dispatch(x: torch.Tensor, routing: Routing, experts: list[LoRAExpert], out_features: int,
              expand: Callable | None = None) -> torch.Tensor:
    """Token-level sparse routing: each expert runs only on the (token, slot) pairs routed to it.

    Slots are sorted by expert and run as one grouped matmul over the sorted rows
    (``grouped_mm``); where it is unavailable, the pool runs as one concatenated LoRA
    (``_mix``, zero weights off the routed slots). Null-expert slots (-1) keep their row
    with weight 0, and every expert gets one more row of weight 0 (no group is empty), which
    costs a little compute but keeps the group sizes on the device.
    """
    E, k = len(experts), routing.indices.shape[-1]
    dtype = experts[0].A.dtype
    if not _grouped_mm_ok(x.new_empty(0, dtype=dtype), (x.shape[-1], out_features, max(e.rank for e in experts))):
        return _mix(x, routing, experts, out_features, expand)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    idx = routing.indices.reshape(-1)  # (N*k,)
    w = routing.weights.reshape(-1)  # (N*k,)
    null = idx < 0
    slots = torch.arange(E, device=idx.device)
    idx = torch.cat([idx.masked_fill(null, 0), slots])  # (N*k + E,): one zero-weight slot per expert
    w = torch.cat([w.masked_fill(null, 0), w.new_zeros(E)])
    order = torch.argsort(idx, stable=True)  # (M,) slots grouped by expert
    token = torch.where(order < null.numel(), order // k, 0)  # (M,) source token of each slot (row 0: padding)
    offs = torch.searchsorted(idx.index_select(0, order), slots, right=True).to(torch.int32)  # (E,) group ends
    xs = x2.index_select(0, token).to(dtype)  # (M, d_in)
    ws = w.index_select(0, order).unsqueeze(-1).to(xs.dtype)  # (M, 1)
    y = _grouped_lora(xs, ws, offs, experts)
    out = y.new_zeros(x2.shape[0], out_features).index_add(0, token, y)
    return out.view(*lead, out_features)


def _grouped_mm_ok(x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    # grouped_mm (torch >= 2.8) runs on the CPU in any float dtype; its CUDA kernels
    # want bf16 on SM >= 8.0. Both want every row stride a multiple of 16 bytes.
    if not hasattr(F, "grouped_mm") or any(d * x.element_size() % 16 for d in dims):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8


def _grouped_lora(xs: torch.Tensor, ws: torch.Tensor, offs: torch.Tensor, experts: list[LoRAExpert]) -> torch.Tensor:
    r = max(e.rank for e in experts)
    # Experts of lower rank are zero-padded to the largest rank (zero rows add nothing).
    At = torch.stack([(e.A if e.rank == r else F.pad(e.A, (0, 0, 0, r - e.rank))).t() for e in experts])  # (E, d_in, r)
    # (E, r, d_out)
    Bt = torch.stack([(e.B if e.rank == r else F.pad(e.B, (0, r - e.rank))).t() * e.scale for e in experts])
    h = F.grouped_mm(xs, At, offs=offs) * ws  # (M, r); weights applied in rank space
    return F.grouped_mm(h, Bt, offs=offs)  # (M, d_out)


def _mix(x: torch.Tensor, routing: Routing, experts: list[LoRAExpert], out_features: int,
         expand: Callable | None = None) -> torch.Tensor:
    """Dense or per-sample routing: one concatenated LoRA over the experts that can get weight
    (``routing.active``; all of them where only the weights tell)."""
    weights = routing.dense(len(experts))  # (*lead, E)
    positions = tuple(range(len(experts))) if routing.active is None else routing.active
    if not positions:  # every sample went to the null expert
        return x.new_zeros(*x.shape[:-1], out_features)
    chosen = [experts[i] for i in positions]
    A = torch.cat([e.A for e in chosen])  # (R, d_in), R = sum of ranks
    B = torch.cat([e.B * e.scale for e in chosen], dim=1)  # (d_out, R)
    index = (expand or _expand_index)(positions, tuple(e.rank for e in chosen), x.device)  # (R,)
    h = F.linear(adapter_input(x, A.dtype), A)  # (..., R)
    w = weights.to(A.dtype).index_select(-1, index)  # (*lead, R)
    return F.linear(h * w, B)  # (..., d_out)
