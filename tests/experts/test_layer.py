"""ExpertLayer behaviour beyond the contract: compute paths, pools, routers, hooks, dtypes."""

import pytest
import torch
from torch import nn

import mllm_cl.experts.layer as layer_mod
from mllm_cl.experts import ExpertLayer, FixedRouter, PostHocGateRouter, Router, Routing, TopKRouter, routing_context
from mllm_cl.experts.injection import inject_experts
from mllm_cl.experts.layer import _dispatch


def _pool(n, d_in=16, d_out=32, ranks=None, router=None):
    layer = ExpertLayer(nn.Linear(d_in, d_out), router=router, rank=4)
    for i in range(n):
        nn.init.normal_(layer.add_expert(f"e{i}", rank=None if ranks is None else ranks[i]).B)
    return layer


def _reference(layer, x, routing):
    w = routing.dense(len(layer.experts))
    return sum(w[..., i : i + 1] * e(x) for i, e in enumerate(layer.experts.values()))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_dispatch_paths_match_reference_values_and_grads(monkeypatch, grouped):
    if grouped and not hasattr(layer_mod.F, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm (added in 2.8); the loop path serves")
    monkeypatch.setattr(layer_mod, "_grouped_mm_ok", lambda x, dims: grouped)
    layer = _pool(6, ranks=[4, 8, 4, 4, 8, 4])  # mixed ranks: padded in the grouped path
    x = torch.randn(2, 7, 16)
    idx = torch.randint(-1, 6, (2, 7, 3))  # -1: the null expert
    routing = Routing(weights=torch.rand(2, 7, 3), indices=idx)
    experts = list(layer.experts.values())
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = _dispatch(x1, routing, experts, 32)
    ref = _reference(layer, x2, routing)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x1] + [p for e in experts for p in e.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x2] + [p for e in experts for p in e.parameters()], g)
    for a, b in zip(grads, ref_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # sums in another order


def test_large_pools_dispatch_and_small_pools_concatenate(monkeypatch):
    calls = []
    real = layer_mod._dispatch
    monkeypatch.setattr(layer_mod, "_dispatch", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 5, 16)
    _pool(2, router=TopKRouter(16, top_k=2))(x)
    _pool(8, router=TopKRouter(16, top_k=2))(x)  # sum of ranks 32 <= 4 * k * r = 32: concatenate
    assert calls == []
    _pool(16, router=TopKRouter(16, top_k=2))(x)
    assert calls == [1]


def test_single_expert_without_router_and_error_with_several():
    layer = _pool(1)
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.experts["e0"](x))
    layer.add_expert("e1")
    with pytest.raises(RuntimeError, match="2 experts and no router"):
        layer(x)


def test_init_from_copies_and_checks_rank():
    layer = _pool(1)
    copy = layer.add_expert("copy", init_from="e0")
    torch.testing.assert_close(copy.B, layer.experts["e0"].B)
    assert copy.A.data_ptr() != layer.experts["e0"].A.data_ptr()
    with pytest.raises(ValueError, match="rank 4 into rank 2"):
        layer.add_expert("small", rank=2, init_from="e0")


def test_remove_expert_leaves_routers_consistent():
    layer = _pool(3, router=TopKRouter(16, top_k=2))
    layer.remove_expert("e1")
    assert layer.expert_names == ["e0", "e2"] == layer.routers["default"].expert_names
    assert set(layer.routers["default"].rows) == {"e0", "e2"}
    layer(torch.randn(2, 3, 16))


def test_per_sample_router_choice_in_a_mixed_batch():
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(16, 32))
    inject_experts(holder, ["proj"], lambda n, lin: ExpertLayer(lin, rank=4), scope="")
    layer = holder.proj
    for name in ("a", "b"):
        nn.init.normal_(layer.add_expert(name, routers=[]).B)
    layer.add_router("ra", FixedRouter(16, expert="a")).add_expert("a")
    layer.add_router("rb", FixedRouter(16, expert="b")).add_expert("b")
    x = torch.randn(3, 4, 16)
    with routing_context(holder, router_choice=["ra", "rb", "ra"]):
        y = holder(x)
    base = layer.base_layer(x)
    torch.testing.assert_close(y[0], base[0] + layer.experts["a"](x[0]))
    torch.testing.assert_close(y[1], base[1] + layer.experts["b"](x[1]))
    torch.testing.assert_close(y[2], base[2] + layer.experts["a"](x[2]))
    with (routing_context(holder, router_choice=["ra", "rb"]),
          pytest.raises(ValueError, match="2 entries for a batch of 3")):
        holder(x)


def test_gradient_transforms_run_on_request_and_can_be_removed():
    layer = _pool(2, router=TopKRouter(16, top_k=1))
    seen = []

    def halve(layer):
        seen.append(layer)
        for p in layer.experts.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)

    handle = layer.register_gradient_transform(halve)
    layer(torch.randn(3, 5, 16)).square().sum().backward()
    before = {n: p.grad.clone() for n, p in layer.experts.named_parameters() if p.grad is not None}
    layer.apply_gradient_transforms()
    assert seen == [layer]
    for n, p in layer.experts.named_parameters():
        if n in before:
            torch.testing.assert_close(p.grad, before[n] * 0.5)
    handle.remove()
    layer.apply_gradient_transforms()
    assert seen == [layer]


def test_bf16_base_with_fp32_experts():
    layer = ExpertLayer(nn.Linear(16, 32).to(torch.bfloat16), rank=4)
    expert = layer.add_expert("e0").float()
    nn.init.normal_(expert.B)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and expert.A.dtype == torch.float32
    y.float().sum().backward()
    assert expert.A.grad.dtype == torch.float32


def test_wraps_only_linear():
    with pytest.raises(TypeError, match="wraps nn.Linear"):
        ExpertLayer(nn.Conv1d(3, 3, 1))


class _Given(Router):
    """Routes by a given ``Routing``, whatever the input."""

    def __init__(self, in_features: int, routing: Routing) -> None:
        super().__init__(in_features)
        self.routing = routing

    def forward(self, x, context):
        return self.routing


@pytest.mark.parametrize("pool", [16, 3], ids=["dispatch", "concatenated"])
def test_unrouted_experts_get_no_gradient_in_every_dispatch_path(monkeypatch, pool):
    """Only the weights on the device say which experts top-k routing chose: the forward notes it there,
    and the step's gradient hook (``apply_gradient_transforms``, before the optimizer) drops the gradient
    of every expert that got no weight, so AdamW cannot move it."""
    for grouped in (True, False):
        monkeypatch.setattr(layer_mod, "_grouped_mm_ok", lambda x, dims, g=grouped: g)
        layer = _pool(pool)
        x = torch.randn(2, 3, 16)
        idx = torch.zeros(2, 3, 2, dtype=torch.long)
        idx[..., 1] = 1  # every token goes to e0 and e1 only
        layer.add_router("given", _Given(16, Routing(weights=torch.full((2, 3, 2), 0.5), indices=idx)),
                         experts=layer.expert_names)
        layer.active_router = "given"
        layer(x).sum().backward()
        layer.apply_gradient_transforms()
        assert layer.experts["e0"].A.grad is not None and layer.experts["e1"].B.grad is not None
        assert all(p.grad is None for i in range(2, pool) for p in layer.experts[f"e{i}"].parameters()), \
            f"grouped={grouped}"


def test_mixed_expert_dtypes_in_a_large_pool():
    layer = _pool(16, router=TopKRouter(16, top_k=2))
    layer.base_layer.to(torch.bfloat16)
    layer.routers.to(torch.bfloat16)
    for i, e in enumerate(layer.experts.values()):
        e.to(torch.bfloat16 if i % 2 else torch.float32)
    y = layer(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_router_choice_is_checked_even_with_one_router():
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(16, 32))
    inject_experts(holder, ["proj"], lambda n, lin: ExpertLayer(lin, router=FixedRouter(16), rank=4), scope="")
    holder.proj.add_expert("a")
    with routing_context(holder, router_choice=["nope"]), pytest.raises(ValueError, match="router 'nope'"):
        holder(torch.randn(1, 2, 16))
    with pytest.raises(KeyError, match="no router named"):
        holder.proj.add_expert("b", routers=["typo"])
    assert holder.proj.expert_names == ["a"]  # the typo left the layer unchanged


def test_task_router_mapping_survives_removal():
    from mllm_cl.experts import TaskRouter

    layer = ExpertLayer(nn.Linear(16, 32), router=TaskRouter(16), rank=4)
    for name in ("t0", "t1", "t2"):
        layer.add_expert(name)
    layer.remove_expert("t0")
    holder = nn.Sequential()
    holder.add_module("proj", layer)
    layer.slot = layer_mod.ContextSlot()
    with routing_context(holder, task_ids=torch.tensor([1, 2])):
        holder(torch.randn(2, 3, 16))
    assert layer.routers["default"].task_experts == {0: "t0", 1: "t1", 2: "t2"}
    assert layer.last_routing.indices.flatten().tolist() == [0, 1]  # t1, t2 in the pool [t1, t2]


@pytest.mark.parametrize("make", [lambda d: TopKRouter(d, top_k=2), PostHocGateRouter])
def test_rows_added_later_follow_where_the_router_was_moved(make):
    router = make(16).to(torch.float64)  # no parameters yet: the move must still stick
    router.add_expert("a")
    assert all(p.dtype == torch.float64 for p in router.parameters())
    layer = ExpertLayer(nn.Linear(16, 4).double(), rank=2)
    layer.add_expert("a")
    layer.add_router("r", make(16), experts=["a"])
    assert layer.routers["r"].expert_names == ["a"]
    with pytest.raises(KeyError, match="no experts"):
        layer.add_router("s", make(16), experts=["zz"])
