"""Routing-based CL: the post-hoc gate router's three modes and the method's phases, on real layers."""

import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mllm_cl.experts import ExpertSetup, PostHocGateRouter, RoutingContext, expert_layers, routing_context
from mllm_cl.experts.injection import inject_experts
from mllm_cl.experts.layer import ExpertLayer
from mllm_cl.methods import Phase, RoutingCL

D_IN, D_OUT = 16, 6


def _layer(n_experts: int, **router_kwargs) -> tuple[nn.Module, ExpertLayer]:
    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(D_IN, D_OUT))
    inject_experts(holder, ["proj"], lambda name, lin: ExpertLayer(lin, router=PostHocGateRouter(D_IN, **router_kwargs),
                                                                    rank=4), scope="")
    layer = holder.proj
    for i in range(n_experts):
        nn.init.normal_(layer.add_expert(f"e{i}").B)
        nn.init.normal_(layer.routers["default"].gates[f"e{i}"])
    return holder, layer


def _standardize(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)


def test_route_mode_is_standardized_top_k_softmax():
    holder, layer = _layer(5, top_k=2)
    x = torch.randn(2, 7, D_IN)
    with routing_context(holder, RoutingContext()):
        y = holder(x)
    v = torch.stack([layer.routers["default"].gates[f"e{i}"] for i in range(5)])
    z = _standardize(x) @ _standardize(v).T / math.sqrt(D_IN)  # (2, 7, 5)
    top, idx = z.topk(2, dim=-1)
    w = torch.zeros_like(z).scatter(-1, idx, torch.softmax(top, -1))
    ref = layer.base_layer(x) + sum(w[..., i: i + 1] * layer.experts[f"e{i}"](x) for i in range(5))
    torch.testing.assert_close(y, ref)
    routing = layer.last_routing
    assert routing.indices.shape == (2, 7, 2)
    kept = (routing.dense(5) > 0).sum(-1)
    assert (kept == 2).all()  # exactly k_eff experts per token, weights summing to 1
    torch.testing.assert_close(routing.dense(5).sum(-1), torch.ones(2, 7))


@pytest.mark.parametrize("n_experts,top_k,null,k_eff", [(1, 2, False, 1), (3, 2, False, 2), (3, 5, False, 3),
                                                         (1, 2, True, 2), (4, 1, True, 1)])
def test_k_eff_is_min_of_top_k_and_choices(n_experts, top_k, null, k_eff):
    holder, layer = _layer(n_experts, top_k=top_k, null_expert=null)
    with routing_context(holder, RoutingContext()):
        holder(torch.randn(3, 4, D_IN))
    routing = layer.last_routing
    assert routing.indices.shape[-1] == k_eff
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(3, 4))
    if null:  # the null choice scores null_score: index -1, weight on no adapter
        assert routing.probs.shape[-1] == n_experts + 1


def test_null_expert_takes_tokens_whose_gates_score_below_null_score():
    holder, layer = _layer(2, top_k=1, null_expert=True, null_score=100.0)  # the null always wins
    x = torch.randn(2, 3, D_IN)
    with routing_context(holder, RoutingContext()):
        y = holder(x)
    assert (layer.last_routing.indices == -1).all()
    torch.testing.assert_close(y, layer.base_layer(x))


def test_expert_and_gate_stages():
    holder, layer = _layer(3)
    router = layer.routers["default"]
    x = torch.randn(2, 5, D_IN)
    router.train_on("e1")
    with routing_context(holder, RoutingContext()):
        torch.testing.assert_close(holder(x), layer.base_layer(x) + layer.experts["e1"](x))
    router.train_on("e1", gate=True)
    assert not router.normalized
    gate = torch.sigmoid(x @ router.gates["e1"])[..., None]
    with routing_context(holder, RoutingContext()):
        torch.testing.assert_close(holder(x), layer.base_layer(x) + gate * layer.experts["e1"](x))
    router.route()
    assert router.normalized and "mode=route" in repr(router)
    with pytest.raises(ValueError, match="no expert 'e9'"):
        router.train_on("e9")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_IN), nn.ReLU(), nn.Linear(D_IN, D_OUT))


def _method(**kwargs) -> tuple[RoutingCL, nn.Module]:
    method = RoutingCL(ExpertSetup(["0", "2"], scope="", rank=4), **kwargs)
    model = _model()
    model.requires_grad_(False)
    method.build(model)
    return method, model


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_phases_and_trainable_sets():
    method, model = _method(gate_steps=7)
    assert [(p.name, p.steps) for p in method.phases(0, 3)] == [("expert", None), ("gate", 7)]
    assert [p.name for p in _method(gate_steps=0)[0].phases(0, 3)] == ["expert"]
    for t in range(2):
        method.on_task_start(model, t)
        method.on_phase_start(model, t, Phase("expert"))
        assert _trainable(model) == {f"{m}.experts.task{t}.{w}" for m in ("0", "2") for w in ("A", "B")}
        method.on_phase_start(model, t, Phase("gate", steps=7))
        assert _trainable(model) == {f"{m}.routers.default.gates.task{t}" for m in ("0", "2")}
        method.on_task_end(model, t)
        assert not _trainable(model)
        assert all(layer.routers["default"].training_expert is None for layer in expert_layers(model).values())


def test_options_reach_the_router_and_bad_ones_are_refused():
    method, model = _method(top_k=3, null_expert=True, null_score=-1.0)
    router = expert_layers(model)["0"].routers["default"]
    assert (router.top_k, router.null_expert, router.null_score) == (3, True, -1.0)
    with pytest.raises(ValueError, match="leave experts.router unset"):
        RoutingCL(ExpertSetup(["0"], router=PostHocGateRouter))
    with pytest.raises(ValueError, match="gate_steps"):
        RoutingCL(ExpertSetup(["0"]), gate_steps=-1)
    with pytest.raises(ValueError, match="top_k"):
        PostHocGateRouter(D_IN, top_k=0)


#: PHATGOOSE's gate recipe (r-three/phatgoose): 100 optimizer steps (train_gate.sh) of 32 x 32 = 1024 samples
#: (batch 32 in the dataset configs, 32 accumulated in train_single_task.gin), lr 5e-3 with a 6% linear warm-up
#: then constant (train.gin), top-2 renormalized at evaluation (eval_multitask.sh: topk_value=2).
PHATGOOSE_GATE = {"gate_steps": 100, "gate_batch": 1024, "gate_lr": 5e-3, "gate_warmup": 0.06, "top_k": 2}


def test_the_defaults_and_the_config_are_phatgooses_gate_recipe():
    defaults = {name: p.default for name, p in inspect.signature(RoutingCL.__init__).parameters.items()}
    assert {k: defaults[k] for k in PHATGOOSE_GATE} == PHATGOOSE_GATE
    config = Path(__file__).resolve().parents[2] / "configs/methods/routing.yaml"
    options = yaml.safe_load(config.read_text())["model"]["method"]["init_args"]
    assert {k: options.get(k, defaults[k]) for k in PHATGOOSE_GATE} == PHATGOOSE_GATE


def _own_top1(shift: float, tasks: int = 3, d: int = D_IN, seed: int = 0) -> float:
    """RoutingCL's hooks on one adapted linear whose input is task t's tokens, ``shift * sqrt(d) * u_t + noise``
    (u_t orthonormal, noise N(0, I): at shift 1 the tasks' means are as far apart as a token from its own
    task's mean). Each task trains its expert, then its gate alone, as the phases do; returns the share of
    held-out tokens whose top-1 expert is their own task's."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :tasks].T
    means = shift * d ** 0.5 * directions
    maps = [torch.randn(d, D_OUT, generator=g) / d ** 0.5 for _ in range(tasks)]  # what each task adds to the base

    def tokens(t: int, n: int) -> torch.Tensor:
        return means[t] + torch.randn(n, d, generator=g)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, D_OUT))
    model.requires_grad_(False)
    method = RoutingCL(ExpertSetup(["0"], scope="", rank=4))
    method.build(model)
    for t in range(tasks):
        method.on_task_start(model, t)
        for phase, steps, lr in (("expert", 200, 1e-2), ("gate", 100, 5e-3)):
            method.on_phase_start(model, t, Phase(phase, steps=steps))
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
            for _ in range(steps):
                x = tokens(t, 64)
                target = model[0].base_layer(x) + x @ maps[t]
                with routing_context(model, RoutingContext()):
                    loss = (model(x) - target).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        method.on_task_end(model, t)
    layer = expert_layers(model)["0"]
    names = layer.routers["default"].expert_names
    own = []
    with torch.no_grad():
        for t in range(tasks):
            with routing_context(model, RoutingContext()):
                model(tokens(t, 200))
            top1 = layer.last_routing.indices[..., 0]
            own.append(float((top1 == names.index(f"task{t}")).float().mean()))
    return sum(own) / len(own)


def test_gates_route_each_token_to_its_own_expert_when_the_tasks_inputs_are_separable():
    # The positive control of the gate pipeline (phases, standardized scores, top-k): separable tasks route.
    assert _own_top1(shift=1.0) >= 0.95
    # Inputs that carry little task identity: the same pipeline routes far less of them to their own expert.
    assert _own_top1(shift=0.1) < 0.8
