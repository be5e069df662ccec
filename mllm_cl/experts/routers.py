"""Routers: map an expert layer's input (and the routing context) to ``Routing``.

Every router keeps the names of the experts it routes over (``expert_names``)
and its per-expert parameters keyed by the same names, so that adding an
expert adds a row, freezing one freezes its row, and a router created at task t
keeps covering exactly the experts that existed then.

A new router is a subclass that implements ``forward`` (and ``init_expert`` if
it has per-expert parameters); see ``examples/custom_router``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.experts.routing import Routing, RoutingContext, index_on


class Router(nn.Module):
    """Base class. ``level`` says which leading shape ``forward`` returns:
    ``token`` (B, L), ``sample`` (B, 1) or ``batch`` (1, 1).

    ``normalized`` routers return weights that sum to 1 over the experts plus
    the null expert; independent gates (sigmoid) set it False and the contract
    tests exempt them.
    """

    level: ClassVar[str] = "token"
    normalized: ClassVar[bool] = True
    #: weights depend on the whole prompt: must be computed at prefill and kept while
    #: decoding (``mllm_cl.eval.generation.greedy_generate`` does; ``generate`` cannot)
    whole_input: ClassVar[bool] = False

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.expert_names: list[str] = []
        # Follows .to(device / dtype) even while the router has no parameters yet, so
        # per-expert parameters added later land where the router was moved.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def new_row(self) -> torch.Tensor:
        """An uninitialized (in_features,) tensor on the router's device and dtype."""
        return torch.empty(self.in_features, device=self._anchor.device, dtype=self._anchor.dtype)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def add_expert(self, name: str) -> None:
        if name in self.expert_names:
            raise ValueError(f"{type(self).__name__} already routes to expert {name!r}")
        self.expert_names.append(name)
        self.init_expert(name)

    def remove_expert(self, name: str) -> None:
        self.expert_names.remove(name)
        for store in self._per_expert_stores():
            if name in store:
                del store[name]

    def init_expert(self, name: str) -> None:
        """Create the per-expert parameters of a newly added expert (none by default)."""

    def expert_parameters(self, name: str) -> list[nn.Parameter]:
        return [store[name] for store in self._per_expert_stores() if name in store]

    def freeze_expert(self, name: str, frozen: bool = True) -> None:
        for p in self.expert_parameters(name):
            p.requires_grad_(not frozen)

    def _per_expert_stores(self) -> list[nn.ParameterDict]:
        return [m for m in self.children() if isinstance(m, nn.ParameterDict)]

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, context)")

    # Routers hold a Python list of names, which ``state_dict`` does not carry.
    # Checkpoints record it in structure.json; ``load_state_dict`` needs the
    # same experts added first.
    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, experts={self.expert_names}"


class LinearRouter(Router):
    """Shared part of the softmax routers: one logit row ``W_e`` per expert,
    ``logits = x W^T`` (a bias-free ``Linear(in_features -> E)`` split by expert),
    initialized as ``nn.Linear`` initializes its weight.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features)
        self.rows = nn.ParameterDict()

    def init_expert(self, name: str) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        self.rows[name] = nn.Parameter(self.new_row().uniform_(-bound, bound))

    def weight(self) -> torch.Tensor:
        """The (E, in_features) logit matrix in expert order.

        ``stack`` splits the gradient back per row without allocating a
        full-size gradient per expert (unlike indexing one big parameter).
        """
        if not self.expert_names:
            raise RuntimeError(f"{type(self).__name__} has no experts to route to")
        return torch.stack([self.rows[n] for n in self.expert_names])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        return F.linear(x.to(w.dtype), w)  # (..., E)


class SoftmaxRouter(LinearRouter):
    """CoIN's MoELoRA router: dense per-token softmax over every expert."""

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        probs = torch.softmax(self.logits(x), dim=-1)  # (B, L, E)
        return Routing(weights=probs, indices=None, probs=probs)


class TopKRouter(LinearRouter):
    """Per-token top-k: keep the ``k_eff = min(top_k, E)`` largest logits and
    softmax over the kept ones.

    ``null_expert``: add a learned logit for "no adapter"; when it is among the
    kept, its weight is mass routed to nothing (index -1).
    """

    def __init__(self, in_features: int, *, top_k: int = 2, null_expert: bool = False) -> None:
        super().__init__(in_features)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self.null_expert = null_expert
        self.null_row = nn.Parameter(torch.zeros(in_features)) if null_expert else None

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        logits = self.logits(x)  # (B, L, E)
        if self.null_row is not None:
            null = F.linear(x.to(self.null_row.dtype), self.null_row[None])  # (B, L, 1)
            logits = torch.cat([logits, null], dim=-1)
        k = min(self.top_k, logits.shape[-1])
        top, idx = logits.topk(k, dim=-1)  # (B, L, k)
        if self.null_row is not None:
            idx = torch.where(idx == self.num_experts, -1, idx)
        return Routing(weights=torch.softmax(top, dim=-1), indices=idx, probs=torch.softmax(logits, dim=-1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, null_expert={self.null_expert}"


class SequenceTopKRouter(LinearRouter):
    """Per-sample routing from the whole prompt: token softmax probabilities
    (logits divided by ``temperature``) averaged over the sample's real tokens,
    top-k kept and renormalized; the same weights for every token of the sample.

    While generating, the weights are computed at prefill from the prompt and
    reused for every decoded token (``context.cache``), so an answer never
    re-routes itself. Padding is excluded through ``context.token_mask``.
    """

    level = "sample"
    whole_input = True

    def __init__(self, in_features: int, *, top_k: int = 2, temperature: float = 1.0) -> None:
        super().__init__(in_features)
        self.top_k, self.temperature = top_k, temperature

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        key = ("sequence_routing", id(self))
        if context is not None and context.cache.get("decoding") and key in context.cache:
            return context.cache[key]
        probs = torch.softmax(self.logits(x) / self.temperature, dim=-1)  # (B, L, E)
        mask = None if context is None else context.token_mask
        if mask is None:
            mask = torch.ones(x.shape[:-1], device=x.device)
        elif mask.shape != x.shape[:-1]:
            raise ValueError(f"token_mask {tuple(mask.shape)} does not match the routed tokens {tuple(x.shape[:-1])}; "
                             "decode with mllm_cl.eval.generation.greedy_generate, which keeps prefill routing")
        mask = mask.to(probs.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (probs * mask).sum(-2, keepdim=True) / mask.sum(-2, keepdim=True).clamp(min=1)  # (B, 1, E)
        scores = self.reweight(pooled, context)
        k = min(self.top_k, scores.shape[-1])
        top, idx = scores.topk(k, dim=-1)
        routing = Routing(weights=top / top.sum(-1, keepdim=True).clamp(min=torch.finfo(top.dtype).tiny), indices=idx,
                          probs=pooled)
        if context is not None and "decoding" in context.cache:
            context.cache[key] = routing  # prefill: keep for the decoding steps
        return routing

    def reweight(self, pooled: torch.Tensor, context: RoutingContext | None) -> torch.Tensor:
        """The per-sample scores the top-k is taken over (B, 1, E); the pooled probabilities by default."""
        return pooled

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, temperature={self.temperature}"


class BatchMeanRouter(SequenceTopKRouter):
    """SAME's router (docs/methods/same.md): one bias-free logit row per expert.

    Training: per-token ``softmax(W x)`` averaged over every real token of the
    micro-batch (``context.extra["attention_mask"]``, else ``token_mask``) gives one
    weight vector for the whole batch; no top-k. Experts named in ``masked`` get
    weight 0 and the rest are renormalized, so a masked expert is left out of the
    forward and gets no gradient. ``probs`` keeps the per-token distribution for
    the method's statistics.

    Evaluation (``eval()``): logits divided by the number of experts, softmax,
    averaged over each sample's prompt, multiplied by the sample's task prior over
    the experts when the context carries one (``context.extra["prior"]``, (B, E): SAME's
    prototype prior), top-``top_k`` renormalized, computed at prefill and kept while
    decoding (``SequenceTopKRouter``); masks do not apply.
    """

    def __init__(self, in_features: int, *, top_k: int = 2) -> None:
        super().__init__(in_features, top_k=top_k)
        self.masked: set[str] = set()
        self._kept: tuple | None = None  # (unmasked positions, device) and their index tensor

    @property
    def level(self) -> str:  # one vector per micro-batch in training, per sample at evaluation
        return "batch" if self.training else "sample"

    def reweight(self, pooled: torch.Tensor, context: RoutingContext | None) -> torch.Tensor:
        prior = None if context is None else context.extra.get("prior")
        if prior is None:
            return pooled
        if prior.shape != (pooled.shape[0], pooled.shape[-1]):
            raise ValueError(f"prior {tuple(prior.shape)} does not match {pooled.shape[0]} samples x "
                             f"{pooled.shape[-1]} experts")
        return pooled * prior.to(pooled.dtype).unsqueeze(1)  # (B, 1, E)

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        if not self.training:
            self.temperature = float(self.num_experts)
            return super().forward(x, context)
        probs = torch.softmax(self.logits(x), dim=-1)  # (B, L, E)
        mask = None if context is None else context.extra.get("attention_mask", context.token_mask)
        if mask is None:
            mask = torch.ones(x.shape[:-1], device=x.device)
        mask = mask.to(probs.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (probs * mask).sum((0, 1)) / mask.sum().clamp(min=1)  # (E,)
        keep = tuple(i for i, n in enumerate(self.expert_names) if n not in self.masked)
        if not keep:
            raise RuntimeError("BatchMeanRouter: every expert is masked")
        idx = self._keep_index(keep, x.device)
        weights = pooled.index_select(0, idx)
        weights = weights / weights.sum()
        shape = (1,) * (x.dim() - 1) + (len(keep),)
        return Routing(weights=weights.view(shape), indices=idx.view(shape), probs=probs, active=keep)

    def _keep_index(self, keep: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The unmasked experts' positions on ``device``, made again only when the masks change."""
        cached = self._kept
        if cached is None or cached[0] != (keep, str(device)):
            cached = self._kept = ((keep, str(device)), index_on(device, keep))
        return cached[1]


class CentroidRouter(Router):
    """CRAM's centroid routing (docs/methods/cram.md): one learnable centroid per expert in the
    space of a per-sample embedding (``context.image_embeds``, dimension ``embed_dim``),
    ``w_b = softmax_k(-||x_b - c_k||^2 / (2 sigma^2 s))``, dense over the experts.

    ``s`` is the mean of the experts' spreads (``set_spread``; 1 until set): CRAM sets an
    expert's spread to the mean squared distance of its task's embeddings to their
    centroid, so ``sigma`` is in units of the tasks' own spread and means the same at any
    feature scale and dimension; with every spread 1, ``sigma`` is absolute (the authors'
    sigma = 2 on raw CLIP embeddings). One ``s`` for all experts keeps the nearest centroid
    the most weighted one (a wider kernel per broad task would draw its neighbours' samples).
    Centroids start at zero; the method sets each from its task's mean
    embedding (``set_centroid``). Freezing an expert freezes its centroid. With one
    embedding for the whole batch (every row the same) the batch gets one weight vector.
    ``context.extra["visible_experts"]`` (B,), when given, limits sample b to the first n_b
    experts (CRAM's oracle: each sample routed as its task's training routed it).
    """

    level = "sample"

    def __init__(self, in_features: int, *, embed_dim: int, sigma: float = 1.0) -> None:
        super().__init__(in_features)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.embed_dim, self.sigma = embed_dim, sigma
        self.centroids = nn.ParameterDict()
        self.register_buffer("spreads", torch.zeros(0))  # (E,) in expert order

    def init_expert(self, name: str) -> None:
        self.centroids[name] = nn.Parameter(torch.zeros(self.embed_dim, device=self._anchor.device,
                                                        dtype=self._anchor.dtype))
        self.spreads = torch.cat([self.spreads.to(self._anchor), torch.ones(1).to(self._anchor)])

    def remove_expert(self, name: str) -> None:
        i = self.expert_names.index(name)
        self.spreads = torch.cat([self.spreads[:i], self.spreads[i + 1:]])
        super().remove_expert(name)

    @torch.no_grad()
    def set_centroid(self, name: str, value: torch.Tensor) -> None:
        self.centroids[name].copy_(value)

    @torch.no_grad()
    def set_spread(self, name: str, value: float) -> None:
        if not value > 0:
            raise ValueError(f"CentroidRouter: the spread of {name!r} must be > 0, got {value}")
        self.spreads[self.expert_names.index(name)] = value

    def logits(self, emb: torch.Tensor, visible: torch.Tensor | None = None,
               visible_list: list[int] | None = None) -> torch.Tensor:
        """(B, E) ``-||x_b - c_k||^2 / (2 sigma^2 s)`` for embeddings (B, D). ``visible`` (B,): sample b
        sees only the first ``visible[b]`` experts (in the order added), with ``s`` their mean spread:
        the routing as it was when that many experts existed; the others get ``-inf``. ``visible_list``:
        the same counts on the host, checked there (read from ``visible`` when not given)."""
        c = torch.stack([self.centroids[n] for n in self.expert_names])  # (E, D)
        dist = (emb.to(c.dtype)[:, None, :] - c[None]).square().sum(-1)  # (B, E)
        spreads = self.spreads.to(dist.dtype)
        if visible is None:
            return -dist / (2 * self.sigma ** 2 * spreads.mean())
        E = len(self.expert_names)
        n = visible.to(dist.device).long()
        counts = visible.tolist() if visible_list is None else visible_list
        if any(v < 1 or v > E for v in counts):
            raise ValueError(f"CentroidRouter: visible_experts must be in 1..{E}, got {list(counts)}")
        k = torch.arange(E, device=dist.device)
        mean_spread = (spreads.cumsum(0) / (k + 1))[n - 1]  # (B,) the mean over the first n experts
        out = -dist / (2 * self.sigma ** 2 * mean_spread[:, None])
        return out.masked_fill(k[None] >= n[:, None], float("-inf"))

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        if context is None:
            raise ValueError("CentroidRouter needs `image_embeds` in the routing context; none is active")
        emb = context.require("image_embeds", "CentroidRouter")  # (B, D)
        visible = context.extra.get("visible_experts")
        counts = None if visible is None else context.host_list("visible_experts")  # once per context
        w = torch.softmax(self.logits(emb, visible, counts), dim=-1)
        return Routing(weights=w.view(w.shape[0], *([1] * (x.dim() - 2)), -1).to(x.dtype), indices=None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embed_dim={self.embed_dim}, sigma={self.sigma}"


class TaskRouter(Router):
    """Routes each sample to the expert of its task (``context.task_ids``).

    ``task_experts`` maps a task id to an expert name; an expert added without a
    mapping takes the next task id (task ``i`` -> the ``i``-th expert added),
    recorded explicitly so later removals never shift the mapping. Used by the ``individual`` baseline and for
    evaluation with the true task id. Task id -1 (a general task's samples: no trained task) routes to no expert.
    """

    level = "sample"

    def __init__(self, in_features: int, *, task_experts: dict[int, str] | None = None) -> None:
        super().__init__(in_features)
        self.task_experts = dict(task_experts or {})
        self._added = 0

    def init_expert(self, name: str) -> None:
        # Record "task i -> i-th expert added" explicitly, so removing an expert never
        # shifts later tasks onto the wrong expert.
        if name not in self.task_experts.values():
            while self._added in self.task_experts:
                self._added += 1
            self.task_experts[self._added] = name
        self._added += 1

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        if context is None:
            raise ValueError("TaskRouter needs `task_ids` in the routing context; none is active")
        context.require("task_ids", "TaskRouter")
        task_ids = context.host_list("task_ids")  # read once per context, not per layer
        positions = []
        for t in task_ids:
            if t < 0:  # a sample of no trained task (a general task): the base model alone
                positions.append(-1)
                continue
            name = self.task_experts.get(t)
            if name is None or name not in self.expert_names:
                raise ValueError(f"TaskRouter has no expert for task id {t}; task -> expert: {self.task_experts}")
            positions.append(self.expert_names.index(name))
        idx = context.device_index(positions, x.device).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1)
        return Routing(weights=torch.ones(idx.shape, dtype=x.dtype, device=x.device), indices=idx,
                       active=tuple(sorted({p for p in positions if p >= 0})))


class FixedRouter(Router):
    """Routes everything to one named expert (by default the newest one).

    The ``lora_ft`` baseline and single-expert training phases use it.
    """

    level = "batch"

    def __init__(self, in_features: int, *, expert: str | None = None) -> None:
        super().__init__(in_features)
        self.expert = expert

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        if not self.expert_names:
            raise RuntimeError("FixedRouter has no experts to route to")
        name = self.expert or self.expert_names[-1]
        if name not in self.expert_names:
            raise ValueError(f"FixedRouter expert {name!r} is not among {self.expert_names}")
        shape = (1,) * x.dim()  # broadcasts over every sample and token
        i = self.expert_names.index(name)
        return Routing(weights=torch.ones(shape, dtype=x.dtype, device=x.device),
                       indices=torch.full(shape, i, device=x.device), active=(i,))


class PostHocGateRouter(Router):
    """Post-hoc gate vectors (PHATGOOSE), the router of routing-based CL (docs/methods/routing.md).

    Each expert ``k`` has a gate vector ``v_k`` (``gates[k]``, zeros when added).
    Three modes, set by the method between phases:

    - ``train_on(name)``: everything to expert ``name`` with weight 1 (the expert
      stage: ``y = W0 x + s B_t A_t x``);
    - ``train_on(name, gate=True)``: expert ``name`` weighted by its own gate,
      ``sigmoid(v_t . x)`` per token (the gate stage; not normalized). Samples marked negative
      (``context.extra["negative"]``, (B,) bool: the ``gate_negatives`` extension) are weighted by the
      gate without a gradient to it, and ``negative_loss``, a loss that closes the gate there, is
      ``-log(1 - sigmoid(v_t . x))`` averaged over each negative sample's real tokens (``context.token_mask``),
      summed over them and divided by the batch's samples (as a per-sample mean it is the same whether
      the batch is split over processes or not);
    - ``route()`` (the default): per token, standardize ``x`` and every ``v_k``
      (zero mean, unit variance over features, no affine, ``eps``), score
      ``z_k = x_bar . v_bar_k / sqrt(d_in)``, keep the ``k_eff = min(top_k,
      choices)`` best and softmax over the kept.

    ``null_expert`` **[choice]**: one more choice whose score is the constant
    ``null_score`` (default 0, the expected score of a gate unrelated to the
    token); mass routed to it goes to no adapter (index -1). The paper names the
    option without fixing its score, and the recipe trains no gate for it.
    """

    level = "token"

    def __init__(self, in_features: int, *, top_k: int = 2, null_expert: bool = False, null_score: float = 0.0,
                 eps: float = 1e-5) -> None:
        super().__init__(in_features)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k, self.null_expert, self.null_score, self.eps = top_k, null_expert, null_score, eps
        self.gates = nn.ParameterDict()
        self.training_expert: str | None = None
        self.gating = False
        self.negative_loss: torch.Tensor | None = None  # the last gate-stage forward's, with negatives

    @property
    def normalized(self) -> bool:  # a sigmoid gate is its own probability
        return not self.gating

    def init_expert(self, name: str) -> None:
        self.gates[name] = nn.Parameter(self.new_row().zero_())

    def train_on(self, name: str, *, gate: bool = False) -> None:
        if name not in self.expert_names:
            raise ValueError(f"PostHocGateRouter has no expert {name!r} (experts: {self.expert_names})")
        self.training_expert, self.gating = name, gate

    def route(self) -> None:
        self.training_expert, self.gating = None, False

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., E) standardized dot products ``x_bar . v_bar_k / sqrt(d_in)``."""
        if not self.expert_names:
            raise RuntimeError("PostHocGateRouter has no experts to route to")
        v = torch.stack([self.gates[n] for n in self.expert_names])  # (E, d_in)
        d = self.in_features
        x_bar = F.layer_norm(x.to(v.dtype), (d,), eps=self.eps)
        v_bar = F.layer_norm(v, (d,), eps=self.eps)
        return F.linear(x_bar, v_bar) / math.sqrt(d)

    def forward(self, x: torch.Tensor, context: RoutingContext | None) -> Routing:
        if self.training_expert is not None:
            i = self.expert_names.index(self.training_expert)
            if not self.gating:  # one expert for the whole batch: a plain LoRA forward
                shape = (1,) * x.dim()
                return Routing(weights=torch.ones(shape, dtype=x.dtype, device=x.device),
                               indices=torch.full(shape, i, device=x.device), active=(i,))
            v = self.gates[self.training_expert]
            logit = F.linear(x.to(v.dtype), v[None])  # (B, L, 1)
            negative = None if context is None else context.extra.get("negative")
            if negative is not None:
                logit = self._close_on(negative, logit, F.linear(x.to(v.dtype), v.detach()[None]), context)
            w = torch.sigmoid(logit)
            return Routing(weights=w, indices=torch.full(w.shape, i, device=x.device), active=(i,))
        self.negative_loss = None
        z = self.scores(x)  # (B, L, E)
        if self.null_expert:
            z = torch.cat([z, z.new_full((*z.shape[:-1], 1), self.null_score)], dim=-1)
        k = min(self.top_k, z.shape[-1])
        top, idx = z.topk(k, dim=-1)
        if self.null_expert:
            idx = torch.where(idx == self.num_experts, -1, idx)
        return Routing(weights=torch.softmax(top, dim=-1), indices=idx, probs=torch.softmax(z, dim=-1))

    def _close_on(self, negative: torch.Tensor, logit: torch.Tensor, frozen: torch.Tensor,
                  context: RoutingContext) -> torch.Tensor:
        """The gate-stage logits with the negative samples' taken from ``frozen`` (no gradient to the gate
        through their forward), and ``negative_loss`` set from theirs."""
        negative = negative.to(logit.device).bool().view(-1, 1, 1)  # (B, 1, 1)
        mask = context.token_mask
        tokens = negative[..., 0].expand(logit.shape[:2])  # (B, L)
        if mask is not None:
            tokens = tokens & mask.to(logit.device).bool()
        per_sample = (F.softplus(logit[..., 0]) * tokens).sum(1) / tokens.sum(1).clamp(min=1)  # (B,), 0: positives
        self.negative_loss = per_sample.sum() / logit.shape[0]
        return torch.where(negative, frozen, logit)

    def extra_repr(self) -> str:
        mode = "route"
        if self.training_expert is not None:
            mode = f"{'gate' if self.gating else 'train'}:{self.training_expert}"
        return (f"{super().extra_repr()}, top_k={self.top_k}, null_expert={self.null_expert}, "
                f"null_score={self.null_score}, mode={mode}")
