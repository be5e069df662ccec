"""The oracle (``route_by: task_id``) of routing-based CL, SAME and CRAM, on the tiny random backbone.

Each method runs the continual loop's hooks and training forwards (``mllm_cl.system.loop`` and
``ContinualMLLM.forward_batch``, without Lightning: a few SGD steps per phase, SAME's gradient
rewrites and statistics as its callback runs them). Then, on a batch that mixes tasks, a general
sample (task id -1) and a task not trained yet:

- the oracle's logits and greedy answers of a sample of task t equal those of a copy of the model
  whose expert layers hold only task t's expert and no router (weight 1: plain LoRA), and a sample
  with no trained task gets the base model;
- a bad ``route_by`` is refused naming the option, and the default routes as the method does.

Training is unchanged by the switch. The option is read in two places only: the evaluation branch
of ``routing_context`` (``training=False``), and, for ``routing`` and ``cram``, the registration of each
new expert with a ``TaskRouter`` that has no parameters, draws no random numbers and is named by no
training forward (the training contexts and the active routers are the method's own). So the hooks
and training forwards below are the whole of what could differ between the two settings, and the
test that every trained tensor (and SAME's anchors, CRAM's prototypes and groups) is bit-identical
with and without the oracle after the same steps stands for a micro run through the loop.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from mllm_cl.backbones import build_preset
from mllm_cl.eval.generation import greedy_generate
from mllm_cl.experts import ExpertSetup, RoutingContext, TaskRouter, expert_layers, routing_context
from mllm_cl.methods import CRAM, SAME, RoutingCL
from mllm_cl.methods.base import ORACLE_ROUTER
from mllm_cl.use.decision import decisions

N_IMAGE, TEXT = 16, 6  # the tiny backbone's image tokens; text tokens per sample


def _batch(task_ids: list[int], seed: int, *, answer: int = 3) -> dict:
    """Image tokens, then text; the last ``answer`` tokens are the answer (labels), the rest the prompt."""
    g = torch.Generator().manual_seed(seed)
    B = len(task_ids)
    ids = torch.cat([torch.full((B, N_IMAGE), 4), torch.randint(10, 200, (B, TEXT), generator=g)], dim=1)
    labels = ids.clone()
    labels[:, :-answer] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "image_mask": ids == 4,
            "pixel_values": torch.randn(B, 3, 32, 32, generator=g), "has_image": torch.ones(B, dtype=torch.bool),
            "instruction": ["What colour is it?"] * B, "task_ids": torch.tensor(task_ids)}


def _build(cls, targets, **kwargs):
    torch.manual_seed(0)
    backbone = build_preset("tiny-clip-llama", seed=0)
    model = backbone.model
    model.requires_grad_(False)
    method = cls(ExpertSetup(targets, rank=4), **kwargs)
    method.tokenizer = backbone.tokenizer
    method.build(model)
    return method, model


def _train(method, model, tasks: int, steps: int = 2) -> None:
    """The loop's hooks around ``steps`` SGD steps per phase, each a training forward as the module runs it."""
    model.train()
    for t in range(tasks):
        method.on_task_start(model, t)
        for phase in method.phases(t, tasks):
            method.on_phase_start(model, t, phase)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=0.5)
            for s in range(steps):
                batch = _batch([t] * 4, seed=100 * t + s)
                ctx = method.routing_context(batch, training=True) or RoutingContext()
                if ctx.token_mask is None:
                    ctx.token_mask = batch["attention_mask"].bool() & (batch["labels"] == -100)
                with routing_context(model, ctx):
                    out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=batch["pixel_values"], labels=batch["labels"])
                    extra = method.extra_loss(model, batch)
                (out.loss if extra is None else out.loss + extra).backward()
                for layer in expert_layers(model).values():
                    layer.apply_gradient_transforms()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if isinstance(method, SAME):  # its statistics callback, after the optimizer step
                    method.observe(model)
            method.on_phase_end(model, t, phase)
        method.on_task_end(model, t)


def _spread_experts(model) -> None:
    """Experts far apart (a few SGD steps leave B near zero): a wrong routing would show."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in expert_layers(model).values():
            for expert in layer.experts.values():
                expert.B.copy_(torch.randn(expert.B.shape, generator=g) * 0.5)


def _only(model, expert: str | None):
    """A copy of ``model`` whose expert layers hold ``expert`` alone and no router (weight 1, plain
    LoRA), or no expert at all (``None``: the base model)."""
    ref = copy.deepcopy(model)
    for layer in expert_layers(ref).values():
        for name in list(layer.routers):
            del layer.routers[name]
        for name in layer.expert_names:
            if name != expert:
                layer.remove_expert(name)
    return ref


def _logits(model, batch, context: RoutingContext | None = None) -> torch.Tensor:
    context = context or RoutingContext()
    context.token_mask = batch["attention_mask"]  # the prompt's tokens, as at evaluation
    with torch.no_grad(), routing_context(model, context):
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits


def _generate(model, batch, context: RoutingContext | None = None) -> torch.Tensor:
    return greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           max_new_tokens=4, eos_token_id=-1, pad_token_id=0, context=context)


def _check_oracle(method, model, batch, own: dict[int, str]) -> torch.Tensor:
    """Sample b of the oracle equals the model holding only ``own[task b]`` (the base where none):
    logits, and every token of the greedy answer. Returns the oracle's logits."""
    model.eval()
    got = _logits(model, batch, method.routing_context(batch, training=False))
    answers = _generate(model, batch, method.routing_context(batch, training=False))
    base = _logits(_only(model, None), batch)
    for b, t in enumerate(batch["task_ids"].tolist()):
        ref_model = _only(model, own.get(t))
        torch.testing.assert_close(got[b], _logits(ref_model, batch)[b])
        assert torch.equal(answers[b], _generate(ref_model, batch)[b]), (b, t)
        if t in own:  # the expert does change the output: the comparison has teeth
            assert not torch.allclose(got[b], base[b], atol=1e-3)
    return got


# ----------------------------------------------------------------------- routing-based CL
def _routing(**kwargs):
    method, model = _build(RoutingCL, ["q_proj", "up_proj"], gate_steps=2, gate_batch=None, **kwargs)
    _train(method, model, tasks=2)
    return method, model


def test_routing_oracle_routes_each_sample_to_its_tasks_expert_alone():
    method, model = _routing(route_by="task_id")
    _spread_experts(model)
    with torch.no_grad():
        for layer in expert_layers(model).values():  # gates that would mix the experts
            for gate in layer.routers["default"].gates.values():
                gate.normal_()
    batch = _batch([1, 0, -1, 2], seed=5)  # task 2 is not trained yet: no expert
    got = _check_oracle(method, model, batch, {0: "task0", 1: "task1"})
    gates = _logits(model, batch)  # the layers' own router: the method's routing
    assert not torch.allclose(got[:2], gates[:2], atol=1e-3)
    for layer in expert_layers(model).values():
        router = layer.routers[ORACLE_ROUTER]
        assert isinstance(router, TaskRouter) and router.task_experts == {0: "task0", 1: "task1"}


def test_routing_default_routes_by_the_gates():
    method, model = _routing()
    assert method.route_by == "gates"
    model.eval()
    assert method.routing_context(_batch([0, 1], seed=5), training=False) is None  # the gate router alone
    assert all(list(layer.routers) == ["default"] for layer in expert_layers(model).values())
    with pytest.raises(ValueError, match="route_by"):
        RoutingCL(ExpertSetup(["q_proj"]), route_by="oracle")


def test_routing_training_is_unchanged_by_the_oracle():
    _assert_same_training(*_routing(), *_routing(route_by="task_id"))


# ------------------------------------------------------------------------------------ SAME
def _same(**kwargs):
    kwargs.setdefault("prior", "prototype")
    method, model = _build(SAME, ["up_proj", "down_proj"], num_experts=2, **kwargs)
    _train(method, model, tasks=3)  # tasks 1 and 2 share the last expert e1
    return method, model


def test_same_oracle_uses_only_the_experts_of_the_samples_task():
    method, model = _same(route_by="task_id")
    _spread_experts(model)
    batch = _batch([2, 0, -1, 3, 1], seed=5)  # task 3 is not trained yet: no expert
    got = _check_oracle(method, model, batch, {0: "e0", 1: "e1", 2: "e1"})
    ctx = method.routing_context(batch, training=False)
    assert ctx.extra["prior"].tolist() == [[0, 1], [1, 0], [0, 0], [0, 0], [0, 1]]
    given = [d["choice"] for d in decisions(SimpleNamespace(model=model, method=method), batch, ctx, list("abcd"))]
    assert given == ["the true task, as given: c", "the true task, as given: a", "no task (the base model alone)",
                     "no task (the base model alone)", "the true task, as given: b"]  # what predict shows
    assert method.stage_metrics(["a", "b", "c", "d"])["prior_accuracy"].keys() == {"a", "b", "c", "d"}  # still scored
    # The prototype prior on the same experts routes otherwise.
    method.route_by = "router"
    assert not torch.allclose(got, _logits(model, batch, method.routing_context(batch, training=False)), atol=1e-3)


def test_same_oracle_without_a_prior_and_the_default():
    method, model = _same(prior="none", route_by="task_id")
    _spread_experts(model)
    _check_oracle(method, model, _batch([1, -1, 0], seed=6), {0: "e0", 1: "e1"})
    default, _ = _same()
    assert default.route_by == "router"
    ctx = default.routing_context(_batch([1, 0], seed=6), training=False)  # the prototype prior, no true task
    assert ctx.task_ids is None and ctx.extra["prior"].shape == (2, 2)
    with pytest.raises(ValueError, match="route_by"):
        SAME(ExpertSetup(["up_proj"]), route_by="oracle")


def test_same_training_is_unchanged_by_the_oracle():
    _assert_same_training(*_same(), *_same(route_by="task_id"))


# ------------------------------------------------------------------------------------ CRAM
def _cram(**kwargs):
    method, model = _build(CRAM, ["q_proj"], r_min=2, r_max=3, join_cosine=0.0, **kwargs)
    _train(method, model, tasks=2, steps=3)
    assert method.slots[0]["group"] == method.slots[1]["group"] == 0  # one group: the centroids mix both slots
    return method, model


def _as_of(model, task: int):
    """A copy of ``model`` as it was right after ``task``: the slots of later tasks removed."""
    ref = copy.deepcopy(model)
    for layer in expert_layers(ref).values():
        for name in layer.expert_names:
            if name.startswith("t") and int(name[1:]) > task:
                layer.remove_expert(name)
    return ref


def test_cram_oracle_routes_each_sample_as_its_task_trained():
    """Sample b of task t: the logits and answer of the model as it was after task t, routed by its
    group's centroids (t's true group, its own image feature); no task: the base model."""
    method, model = _cram(route_by="task_id")
    _spread_experts(model)
    for layer in expert_layers(model).values():  # one centroid for both slots: task 1's samples mix them evenly
        router = layer.routers["group0"]
        router.set_centroid("t1", router.centroids["t0"])
    model.eval()
    batch = _batch([1, 0, -1, 2, 0], seed=5)  # task 2 has no slot yet
    ctx = method.routing_context(batch, training=False)
    assert ctx.router_choice == ["group0", "group0", ORACLE_ROUTER, ORACLE_ROUTER, "group0"]
    assert ctx.extra["visible_experts"].tolist() == [2, 1, 1, 1, 1]
    got = _logits(model, batch, ctx)
    answers = _generate(model, batch, method.routing_context(batch, training=False))
    image = ctx.image_embeds
    base = _only(model, None)
    for b, t in enumerate(batch["task_ids"].tolist()):
        if t in method.slots:
            ref = _as_of(model, t)  # its group router holds the slots up to t: the method's own routing then
            ref_ctx = RoutingContext(image_embeds=image, router_choice=["group0"] * len(image))
            want, want_answer = _logits(ref, batch, ref_ctx)[b], _generate(ref, batch, ref_ctx)[b]
            alone = _logits(_only(model, f"t{t}"), batch)[b]
            if t == 1:  # beside t0 (weights 1/2, 1/2), not its slot alone; task 0 had t0 alone
                assert not torch.allclose(got[b], alone, atol=1e-3)
            else:
                torch.testing.assert_close(got[b], alone)
        else:
            want, want_answer = _logits(base, batch)[b], _generate(base, batch)[b]
        torch.testing.assert_close(got[b], want)
        assert torch.equal(answers[b], want_answer), (b, t)
    assert not torch.allclose(got[1], got[0], atol=1e-3)  # task 0 sees t0 alone, task 1 both slots
    given = [d["choice"] for d in decisions(SimpleNamespace(model=model, method=method), batch, ctx, list("abc"))]
    assert given[:3] == ["the true task, as given: b", "the true task, as given: a", "no task (the base model alone)"]
    assert set(method.stage_metrics(["a", "b", "c"])["group_accuracy"]) == {"a", "b", "c"}  # still scored


def test_cram_task_slot_routes_each_sample_to_its_tasks_slot_with_full_weight():
    method, model = _cram(route_by="task_slot")
    _spread_experts(model)
    batch = _batch([1, 0, -1, 2], seed=5)  # task 2 has no slot yet
    got = _check_oracle(method, model, batch, {0: "t0", 1: "t1"})
    ctx = method.routing_context(batch, training=False)
    given = [d["choice"] for d in decisions(SimpleNamespace(model=model, method=method), batch, ctx, list("abc"))]
    assert given == ["the true task, as given: b", "the true task, as given: a", "no task (the base model alone)",
                     "no task (the base model alone)"]
    metrics = method.stage_metrics(["a", "b", "c"])
    assert set(metrics["group_accuracy"]) == {"a", "b", "c"}  # the groups are still scored
    method.route_by = "centroids"  # the method's own routing on the same slots
    assert not torch.allclose(got[:2], _logits(model, batch, method.routing_context(batch, training=False))[:2],
                              atol=1e-3)


def test_cram_default_routes_by_groups_and_centroids():
    method, model = _cram()
    assert method.route_by == "centroids"
    model.eval()
    ctx = method.routing_context(_batch([1, 0], seed=5), training=False)
    assert ctx.router_choice == ["group0", "group0"] and ctx.image_embeds is not None and ctx.task_ids is None
    assert all(ORACLE_ROUTER not in layer.routers for layer in expert_layers(model).values())
    with pytest.raises(ValueError, match="route_by"):
        CRAM(ExpertSetup(["q_proj"]), route_by="oracle")


@pytest.mark.parametrize("route_by", ["task_id", "task_slot"])
def test_cram_training_is_unchanged_by_the_oracle(route_by):
    _assert_same_training(*_cram(), *_cram(route_by=route_by))


# ---------------------------------------------------------------------------------- shared
def _assert_same_training(method, model, oracle_method, oracle_model) -> None:
    """Every trained tensor and the method's stored state bit-identical with and without the oracle."""
    ours, theirs = model.state_dict(), oracle_model.state_dict()
    assert ours.keys() == theirs.keys()  # the oracle's TaskRouter has no tensors
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not changed, changed[:5]
    trained = [k for k in ours if ".experts." in k and k.endswith(".B")]
    assert trained and all(ours[k].abs().sum() > 0 for k in trained)  # the steps did train the experts
    facts, tensors = method.state()
    oracle_facts, oracle_tensors = oracle_method.state()
    assert facts == oracle_facts and tensors.keys() == oracle_tensors.keys()
    assert all(torch.equal(tensors[k], oracle_tensors[k]) for k in tensors)
