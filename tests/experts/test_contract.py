"""Contract suite: every Router and every ExpertLayer in mllm_cl obeys the same rules.

- normalized routers: weights sum to 1 over the experts plus the null expert
  (independent sigmoid gates, ``normalized = False``, are exempt: each gate is
  its own probability and the sum means nothing);
- exactly k_eff = min(k, choices) experts per routing position for top-k routers;
- the layer's output is the base output plus the routing-weighted expert outputs
  (whichever compute path it takes: dispatch or concatenation);
- frozen experts (and their router rows) get no gradient;
- experts are added and frozen by name.

A new Router or ExpertLayer subclass in the package must be added to CASES /
LAYERS below; ``test_every_component_is_covered`` fails until it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import mllm_cl.experts as experts_pkg
from mllm_cl.experts import (
    BatchMeanRouter,
    CentroidRouter,
    ExpertLayer,
    FixedRouter,
    LinearRouter,
    PostHocGateRouter,
    Router,
    RoutingContext,
    SequenceTopKRouter,
    SoftmaxRouter,
    TaskRouter,
    TopKRouter,
    routing_context,
)
from mllm_cl.experts.injection import inject_experts

B, L, D_IN, D_OUT = 3, 5, 12, 10


@dataclass
class Case:
    make: Callable[[int], Router]
    context: Callable[[int], RoutingContext | None] = lambda n_experts: None
    top_k: int | None = None  # a top-k router: expected k_eff = min(top_k, choices)
    null: bool = False
    prepare: Callable[[Router], None] = lambda router: None  # set a mode once the experts exist


def _task_ctx(n_experts: int) -> RoutingContext:
    return RoutingContext(task_ids=torch.arange(B) % n_experts)


CASES = {
    "softmax": Case(SoftmaxRouter),
    "top1": Case(lambda d: TopKRouter(d, top_k=1), top_k=1),
    "top2": Case(lambda d: TopKRouter(d, top_k=2), top_k=2),
    "top2_null": Case(lambda d: TopKRouter(d, top_k=2, null_expert=True), top_k=2, null=True),
    "top5": Case(lambda d: TopKRouter(d, top_k=5), top_k=5),
    "sequence_top2": Case(lambda d: SequenceTopKRouter(d, top_k=2), top_k=2),
    "task": Case(TaskRouter, context=_task_ctx),
    "fixed": Case(FixedRouter),
    "posthoc_top2": Case(lambda d: PostHocGateRouter(d, top_k=2), top_k=2),
    "posthoc_top1_null": Case(lambda d: PostHocGateRouter(d, top_k=1, null_expert=True), top_k=1, null=True),
    "posthoc_top2_null": Case(lambda d: PostHocGateRouter(d, top_k=2, null_expert=True), top_k=2, null=True),
    "posthoc_gate": Case(PostHocGateRouter, prepare=lambda r: r.train_on(r.expert_names[-1], gate=True)),
    "batch_mean": Case(BatchMeanRouter),
    "centroid": Case(lambda d: CentroidRouter(d, embed_dim=6),
                     context=lambda n: RoutingContext(image_embeds=torch.randn(B, 6))),
    "batch_mean_masked": Case(BatchMeanRouter, prepare=lambda r: r.masked.update(r.expert_names[:-1])),
    "batch_mean_eval": Case(BatchMeanRouter, top_k=2, prepare=lambda r: r.eval()),
}
LAYERS = [ExpertLayer]
POOLS = [1, 3, 16]  # 16 with top-k takes the dispatch path


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_component_is_covered():
    covered = {type(c.make(D_IN)) for c in CASES.values()}
    ours = {c for c in _subclasses(Router) if c.__module__.startswith("mllm_cl.")}
    abstract = {LinearRouter}  # a shared base: no forward of its own
    assert ours - abstract <= covered, f"routers missing from the contract suite: {ours - abstract - covered}"
    layers = {c for c in _subclasses(ExpertLayer) if c.__module__.startswith("mllm_cl.")} | {ExpertLayer}
    assert layers <= set(LAYERS), f"expert layers missing from the contract suite: {layers - set(LAYERS)}"
    assert all(hasattr(experts_pkg, c.__name__) for c in covered), "every router is exported from mllm_cl.experts"


def _layer(layer_cls, case: Case, n_experts: int) -> tuple[nn.Module, ExpertLayer]:
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(D_IN, D_OUT))
    inject_experts(holder, ["proj"], lambda name, lin: layer_cls(lin, router=case.make(D_IN), rank=4), scope="")
    layer = holder.proj
    for i in range(n_experts):
        nn.init.normal_(layer.add_expert(f"e{i}").B)
    for p in layer.routers["default"].parameters():  # routers that start at zero (gates) score something
        nn.init.normal_(p)
    case.prepare(layer.routers["default"])
    return holder, layer


def _run(holder, case, n_experts, x):
    with routing_context(holder, case.context(n_experts) or RoutingContext()):
        return holder(x)


@pytest.mark.parametrize("layer_cls", LAYERS)
@pytest.mark.parametrize("n_experts", POOLS)
@pytest.mark.parametrize("case_name", list(CASES))
class TestContract:
    def test_weights_and_k_eff(self, layer_cls, case_name, n_experts):
        case = CASES[case_name]
        holder, layer = _layer(layer_cls, case, n_experts)
        x = torch.randn(B, L, D_IN)
        _run(holder, case, n_experts, x)
        routing = layer.last_routing
        assert routing is not None
        lead = routing.weights.shape[:-1]
        assert torch.broadcast_shapes(lead, x.shape[:-1]) == x.shape[:-1]
        level = layer.routers["default"].level  # an instance's mode may decide (SAME's router)
        expected_lead = {"token": (B, L), "sample": (B, 1), "batch": (1, 1)}[level]
        assert tuple(lead) == expected_lead
        if not layer.routers["default"].normalized:  # an instance's mode may decide (gate stages)
            pytest.skip("independent sigmoid gates are exempt from summing to 1")
        # Sum over the kept experts plus the null expert's slot, per routing position.
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(lead))
        assert (routing.weights >= 0).all()
        if case.top_k is not None:
            choices = n_experts + int(case.null)
            assert routing.indices.shape[-1] == min(case.top_k, choices)
            flat = routing.indices.reshape(-1, routing.indices.shape[-1])
            assert all(len(set(row.tolist())) == row.numel() for row in flat), "an expert kept twice"

    def test_output_is_base_plus_weighted_experts(self, layer_cls, case_name, n_experts):
        case = CASES[case_name]
        holder, layer = _layer(layer_cls, case, n_experts)
        x = torch.randn(B, L, D_IN)
        y = _run(holder, case, n_experts, x)
        w = layer.last_routing.dense(n_experts)  # (*lead, E)
        ref = layer.base_layer(x) + sum(w[..., i : i + 1] * layer.experts[f"e{i}"](x) for i in range(n_experts))
        torch.testing.assert_close(y, ref)

    def test_frozen_experts_get_no_gradient(self, layer_cls, case_name, n_experts):
        case = CASES[case_name]
        holder, layer = _layer(layer_cls, case, n_experts)
        layer.freeze_expert("e0")
        x = torch.randn(B, L, D_IN, requires_grad=True)
        _run(holder, case, n_experts, x).square().sum().backward()
        frozen = list(layer.experts["e0"].parameters()) + layer.routers["default"].expert_parameters("e0")
        assert all(not p.requires_grad and p.grad is None for p in frozen)
        assert layer.base_layer.weight.grad is None
        assert x.grad is not None
        if n_experts > 1:
            trained = [p.grad for i in range(1, n_experts) for p in layer.experts[f"e{i}"].parameters()]
            assert any(g is not None and g.abs().sum() > 0 for g in trained)

    def test_add_and_freeze_by_name(self, layer_cls, case_name, n_experts):
        case = CASES[case_name]
        _, layer = _layer(layer_cls, case, n_experts)
        router = layer.routers["default"]
        assert router.expert_names == layer.expert_names == [f"e{i}" for i in range(n_experts)]
        layer.add_expert("late", rank=2)
        assert layer.experts["late"].rank == 2 and router.expert_names[-1] == "late"
        with pytest.raises(ValueError, match="already exists"):
            layer.add_expert("late")
        with pytest.raises(ValueError, match="must match"):
            layer.add_expert("bad.name")
        layer.freeze_expert("late")
        assert not any(p.requires_grad for p in layer.experts["late"].parameters())
        layer.unfreeze_expert("late")
        assert all(p.requires_grad for p in layer.experts["late"].parameters())
        counts = layer.parameter_counts()
        assert counts["expert:late"] == 2 * (D_IN + D_OUT)
        assert counts["expert:e0"] == 4 * (D_IN + D_OUT)


def test_centroid_router_visible_experts_equals_the_router_before_later_experts_joined():
    """``visible_experts`` n_b: sample b is routed as a router holding only its first n_b experts (their
    centroids, their mean spread); a count outside 1..E is refused."""
    torch.manual_seed(0)
    full = CentroidRouter(4, embed_dim=6, sigma=0.7)
    for i, name in enumerate(["t0", "t1", "t2"]):
        full.add_expert(name)
        full.set_centroid(name, torch.randn(6))
        full.set_spread(name, 0.5 + i)
    emb, x = torch.randn(3, 6), torch.randn(3, 5, 4)
    visible = torch.tensor([1, 2, 3])
    got = full(x, RoutingContext(image_embeds=emb, extra={"visible_experts": visible})).weights  # (3, 1, 3)
    for b, n in enumerate(visible.tolist()):
        before = CentroidRouter(4, embed_dim=6, sigma=0.7)
        for i, name in enumerate(full.expert_names[:n]):
            before.add_expert(name)
            before.set_centroid(name, full.centroids[name])
            before.set_spread(name, 0.5 + i)
        want = before(x[b:b + 1], RoutingContext(image_embeds=emb[b:b + 1])).weights[0, 0]
        torch.testing.assert_close(got[b, 0, :n], want)
        assert bool((got[b, 0, n:] == 0).all())
    with pytest.raises(ValueError, match="visible_experts must be in 1..3"):
        full(x, RoutingContext(image_embeds=emb, extra={"visible_experts": torch.tensor([0, 1, 4])}))
