"""SAME on a tiny backbone: the gradient rewrites in place, masking, statistics buffers, routing modes."""

import json

import pytest
import torch

from mllm_cl.backbones import build_preset
from mllm_cl.experts import BatchMeanRouter, ExpertSetup, RoutingContext, expert_layers, routing_context
from mllm_cl.experts.spectral import expert_rewrite
from mllm_cl.methods import SAME
from mllm_cl.methods.same import activation_sums
from mllm_cl.system.run_dir import RunDir


def _setup(**kwargs):
    backbone = build_preset("tiny-clip-llama", seed=0)
    model = backbone.model
    model.requires_grad_(False)
    kwargs.setdefault("prior", "none")  # the prior has its own tests (test_same_prior.py)
    method = SAME(ExpertSetup(["up_proj", "down_proj"], rank=4), num_experts=3, **kwargs)
    method.tokenizer = backbone.tokenizer
    method.build(model)
    method.on_task_start(model, 0)
    for layer in expert_layers(model).values():
        for e in layer.experts.values():
            torch.nn.init.normal_(e.B, std=0.05)  # B = 0 would leave A without gradient
    return model, method


def _batch(seed=0, b=3, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, -2:] = 0  # right padding on one sample
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _step(model, method, batch):
    """Forward + backward under the method's training context; gradients rewritten; statistics observed."""
    with routing_context(model, method.routing_context(batch, training=True)):
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    for layer in expert_layers(model).values():
        layer.apply_gradient_transforms()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_expert_rewrite_is_the_identity_on_the_first_task():
    model, method = _setup(spectral_routing=False, adaptive_activation=False)
    batch = _batch()
    with routing_context(model, method.routing_context(batch, training=True)):
        model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    before = _grads(model)
    for layer in expert_layers(model).values():
        layer.apply_gradient_transforms()
    after = _grads(model)
    assert before.keys() == after.keys() and any(".A" in n for n in before)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_expert_rewrite_applies_the_previous_tasks_snapshot():
    model, method = _setup(spectral_routing=False, adaptive_activation=False)
    for seed in range(3):
        _step(model, method, _batch(seed))
        method.observe(model)
        model.zero_grad()
    method.on_task_end(model, 0)
    method.on_task_start(model, 1)
    batch = _batch(5)
    with routing_context(model, method.routing_context(batch, training=True)):
        model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    before = _grads(model)
    for layer in expert_layers(model).values():
        layer.apply_gradient_transforms()
    name, layer = next(iter(expert_layers(model).items()))
    stats, k = layer.same, int(layer.same.snapshot_k)
    assert k > 0
    key = f"{name}.experts.e0.A"
    expected = expert_rewrite(before[key], stats.snapshot_directions[:, :k], stats.snapshot_sigma[:k], 0.9)
    torch.testing.assert_close(layer.experts["e0"].A.grad, expected)
    assert torch.equal(layer.experts["e0"].B.grad, before[f"{name}.experts.e0.B"])  # B is not rescaled


def test_router_rewrite_starts_after_warmup_steps():
    model, method = _setup(warmup_steps=2, adaptive_activation=False, curvature_scaling=False)
    layer = next(iter(expert_layers(model).values()))
    changed = []
    for seed in range(4):
        batch = _batch(seed)
        with routing_context(model, method.routing_context(batch, training=True)):
            model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        raw = layer.routers["default"].rows["e0"].grad.clone()
        layer.apply_gradient_transforms()
        changed.append(not torch.equal(raw, layer.routers["default"].rows["e0"].grad))
        method.observe(model)
        model.zero_grad()
    assert changed == [False, False, True, True]


def test_masked_experts_get_no_gradient_and_do_not_move():
    model, method = _setup(spectral_routing=False, curvature_scaling=False)
    for layer in expert_layers(model).values():
        layer.routers["default"].masked = {"e1"}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    layer = next(iter(expert_layers(model).values()))
    frozen = {k: v.clone() for k, v in layer.experts["e1"].state_dict().items()}
    row = layer.routers["default"].rows["e1"].detach().clone()
    _step(model, method, _batch())
    assert layer.experts["e1"].A.grad is None and layer.experts["e1"].B.grad is None
    assert layer.routers["default"].rows["e1"].grad is None
    assert layer.experts["e0"].A.grad is not None
    optimizer.step()
    assert all(torch.equal(layer.experts["e1"].state_dict()[k], v) for k, v in frozen.items())
    assert torch.equal(layer.routers["default"].rows["e1"], row)


def test_masks_never_take_the_current_tasks_expert_and_freeze_once_complete():
    model, method = _setup(spectral_routing=False, curvature_scaling=False, masks_at_start=False)  # the authors' rule
    layer = next(iter(expert_layers(model).values()))
    stats, router = layer.same, layer.routers["default"]
    tokens = torch.randn(10, layer.in_features, dtype=torch.float64)
    # e0 (task 1's) used least and most important: the lowest score, still never masked
    probs = torch.tensor([[0.1, 0.45, 0.45]], dtype=torch.float64).expand(10, 3)
    stats.importance.copy_(torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64))
    stats.importance_seen.fill_(True)
    method._activation(layer, activation_sums(tokens, probs))
    assert "e0" not in router.masked
    method.task = 1  # task 2: its expert is e1; make e0 and e2 score low
    probs = torch.tensor([[0.05, 0.9, 0.05]], dtype=torch.float64).expand(10, 3)
    stats.utilization_seen = False
    method._activation(layer, activation_sums(tokens, probs))
    assert router.masked == {"e0", "e2"} and stats.masks_final
    method._activation(layer, activation_sums(tokens, torch.tensor([[0.9, 0.05, 0.05]],
                                                                   dtype=torch.float64).expand(10, 3)))
    assert router.masked == {"e0", "e2"}  # kept once every other expert is masked
    method.on_task_start(model, 2)
    assert router.masked == set() and not stats.masks_final


@pytest.mark.parametrize("covariance", ["local", "running"])
def test_statistics_are_buffers_that_survive_save_and_load(tmp_path, covariance):
    model, method = _setup(covariance=covariance, refresh_every=1)
    for seed in range(3):
        _step(model, method, _batch(seed))
        method.observe(model)
        model.zero_grad()
    method.on_task_end(model, 0)
    run = RunDir(tmp_path)
    run.save_checkpoint(1, model, {})
    fresh, fresh_method = _setup(covariance=covariance, refresh_every=1)
    fresh_method.on_task_end(fresh, 0)  # the replay of a resume, before the weights are loaded
    run.load_checkpoint(1, fresh)
    saved = {n: b for n, b in model.named_buffers() if ".same." in n}
    loaded = dict(fresh.named_buffers())
    names = {n.split(".same.")[1] for n in saved}
    assert saved and {"snapshot_directions", "snapshot_sigma", "importance"} <= names
    assert ("covariance.basis" in names) == (covariance == "running")  # the local estimate keeps no sketch
    assert all(torch.equal(b, loaded[n]) for n, b in saved.items())
    assert all(int(b) > 0 for n, b in saved.items() if n.endswith("snapshot_k"))


def test_training_routes_the_whole_batch_with_one_renormalized_vector():
    torch.manual_seed(0)
    router = BatchMeanRouter(8)
    for name in ("a", "b", "c"):
        router.add_expert(name)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    routing = router(x, RoutingContext(extra={"attention_mask": mask}))
    probs = torch.softmax(x @ router.weight().T, -1)
    mean = probs[mask.bool()].mean(0)  # over the 8 real tokens of the whole batch
    assert routing.weights.shape == (1, 1, 3)
    torch.testing.assert_close(routing.weights.flatten(), mean)
    router.masked = {"b"}
    routing = router(x, RoutingContext(extra={"attention_mask": mask}))
    assert routing.indices.flatten().tolist() == [0, 2]
    torch.testing.assert_close(routing.weights.flatten(), mean[[0, 2]] / mean[[0, 2]].sum())


def test_evaluation_routes_each_sample_by_its_prompt_top2_of_logits_over_e():
    torch.manual_seed(0)
    router = BatchMeanRouter(8).eval()
    for name in ("a", "b", "c", "d"):
        router.add_expert(name)
    router.masked = {"a", "b", "c"}  # masks do not apply at test time
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    routing = router(x, RoutingContext(token_mask=mask))
    probs = torch.softmax(x @ router.weight().T / 4, -1)
    for b in range(2):
        mean = probs[b][mask[b].bool()].mean(0)
        top, idx = mean.topk(2)
        assert routing.indices[b].flatten().tolist() == idx.tolist()
        torch.testing.assert_close(routing.weights[b].flatten(), top / top.sum())
    alone = router(x[1:], RoutingContext(token_mask=mask[1:]))  # the same weights without a batch neighbour
    torch.testing.assert_close(alone.weights[0], routing.weights[1])


def test_options_are_checked():
    with pytest.raises(ValueError, match="covariance must be 'local' or 'running'"):
        SAME(ExpertSetup(["up_proj"]), covariance="sometimes")
    with pytest.raises(ValueError, match="builds its own router"):
        SAME(ExpertSetup(["up_proj"], router=BatchMeanRouter))


def test_drift_reports_what_a_task_did_to_the_other_experts():
    model, method = _setup(spectral_routing=False, adaptive_activation=False, refresh_every=1)
    for seed in range(2):
        _step(model, method, _batch(seed))
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        method.observe(model)
        model.zero_grad()
    method.on_task_end(model, 0)
    assert method.stage_metrics(["a", "b"])["drift"]["mask_close_step"] == {"median": None, "last": None,
                                                                             "never": 4}
    method.on_task_start(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts.e0." in n}
    for seed in range(2, 4):
        _step(model, method, _batch(seed))
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        method.observe(model)
        model.zero_grad()
    method.on_task_end(model, 1)
    drift = method.stage_metrics(["a", "b"])["drift"]
    assert set(drift["experts"]) == {"e0", "e2"}  # every expert but task 2's own (e1)
    after = dict(model.named_parameters())
    total = sum(float((after[n] - before[n]).square().sum()) for n in before) ** 0.5
    e0 = drift["experts"]["e0"]
    assert total > 0 and e0["update_before_close"] == pytest.approx(total, rel=1e-4)  # the masks never closed
    assert e0["update_after_close"] == 0
    moved_a = sum(float((after[n] - before[n]).square().sum()) for n in before if n.endswith(".A")) ** 0.5
    assert (e0["A_inside_snapshot"] ** 2 + e0["A_outside_snapshot"] ** 2) ** 0.5 == pytest.approx(moved_a, rel=1e-4)
    assert 0 < drift["inside_over_outside_scale"] < 1  # mu / (sigma + mu) over the snapshot's directions
    facts, tensors = method.state()  # kept with the task's checkpoint: a re-evaluation reports it again
    again = _setup(spectral_routing=False, adaptive_activation=False, refresh_every=1)[1]
    again.load_state(json.loads(json.dumps(facts)), tensors)
    again.task = 1
    assert again.stage_metrics(["a", "b"])["drift"] == json.loads(json.dumps(drift))


def test_masks_at_start_close_the_other_experts_before_the_first_step():
    model, method = _setup(masks_at_start=True, refresh_every=1)
    layer = next(iter(expert_layers(model).values()))
    assert layer.routers["default"].masked == set()  # the first task: nothing to protect
    _step(model, method, _batch(0))
    method.observe(model)
    model.zero_grad()
    method.on_task_end(model, 0)
    method.on_task_start(model, 1)
    assert layer.routers["default"].masked == {"e0", "e2"} and layer.same.masks_final
    _step(model, method, _batch(1))  # the first step of task 2 trains its own expert only
    assert layer.experts["e0"].A.grad is None and layer.experts["e1"].A.grad is not None
