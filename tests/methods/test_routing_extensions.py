"""Routing-based CL's two extensions: ``route: mean_activation`` and ``gate_negatives: general``.

Each is checked against a hand computation written here in plain torch (the per-sample vote over
layers; the stored means, one unpadded sample at a time; the gate stage's loss and gradient with
negatives), and on real micro runs (the choice reported, the gates closed on the general task)."""

import math
from pathlib import Path

import pytest
import torch

from mllm_cl.experts import ExpertSetup, PostHocGateRouter, RoutingContext, expert_layers, routing_context
from mllm_cl.fit import main as fit_main
from mllm_cl.methods import RoutingCL
from mllm_cl.methods.base import choice_metrics
from mllm_cl.methods.mean_activation import MeanActivations
from mllm_cl.system.restore import restore

MEAN = ["--model.method.init_args.route", "mean_activation", "--model.method.init_args.gate_steps", "0"]
GATES = ["--model.method.init_args.gate_steps", "12", "--model.method.init_args.gate_batch", "null",
         "--model.method.init_args.gate_lr", "0.05", "--model.method.init_args.gate_warmup", "0"]


def _standardize(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)


def _reference_choice(pooled: list[torch.Tensor], means: list[list[torch.Tensor]], base: bool = False) -> list[int]:
    """pooled[l]: (B, d_l); means[l][t]: (d_l,). Per sample the task whose means are nearest its pooled inputs:
    the root-mean-square difference per feature, summed over the layers. ``base``: the last mean is the
    base's, chosen as -1."""
    B, T = pooled[0].shape[0], len(means[0])
    chosen = []
    for b in range(B):
        total = [0.0] * T
        for rows, layer_means in zip(pooled, means, strict=True):
            for t, m in enumerate(layer_means):
                total[t] += math.sqrt(float(((rows[b] - m) ** 2).mean()))
        best = min(range(T), key=lambda t: total[t])
        chosen.append(-1 if base and best == T - 1 else best)
    return chosen


def test_the_choice_is_the_reference_vote():
    torch.manual_seed(1)
    widths, T, B = [8, 12, 8, 16, 12], 4, 64
    store = MeanActivations()
    means = [[torch.randn(d) for _ in range(T)] for d in widths]
    for t in range(T):
        store.add_task({f"l{i}": means[i][t] for i in range(len(widths))})
    pooled = [torch.randn(B, d) for d in widths]
    got = store.choose({f"l{i}": p for i, p in enumerate(pooled)}).tolist()
    assert got == _reference_choice(pooled, means)
    assert len(set(got)) > 1


def test_the_base_is_one_more_choice():
    torch.manual_seed(2)
    widths, T, B = [8, 12, 8], 3, 64
    store = MeanActivations()
    means = [[torch.randn(d) for _ in range(T + 1)] for d in widths]
    for t in range(T):
        store.add_task({f"l{i}": means[i][t] for i in range(len(widths))})
    store.set_base({f"l{i}": means[i][T] for i in range(len(widths))})
    pooled = [torch.randn(B, d) for d in widths]
    got = store.choose({f"l{i}": p for i, p in enumerate(pooled)}).tolist()
    assert got == _reference_choice(pooled, means, base=True)
    assert -1 in got and set(got) - {-1}
    fresh = MeanActivations()
    fresh.load_state(store.state(), T)
    assert fresh.choose({f"l{i}": p for i, p in enumerate(pooled)}).tolist() == got


def test_choice_metrics_count_the_base_and_the_general_samples():
    hits = {(0, 0): 3, (0, -1): 1, (1, 0): 2, (1, 1): 2, (-1, -1): 3, (-1, 1): 1}
    out = choice_metrics(hits, ["a", "b"], "pick")
    assert out == {"pick_accuracy": {"a": 75.0, "b": 50.0},
                   "pick_confusion": {"a": {"a": 3, "none": 1}, "b": {"a": 2, "b": 2}},
                   "pick_general_to_base": 75.0}


def test_state_round_trips_the_means():
    store = MeanActivations()
    for _t in range(3):
        store.add_task({"x.q_proj": torch.randn(6), "x.down_proj": torch.randn(10)})
    fresh = MeanActivations()
    fresh.load_state(store.state(), 3)
    assert fresh.num_tasks == 3
    for name, ms in store.means.items():
        assert all(torch.equal(a, b) for a, b in zip(ms, fresh.means[name], strict=True))


@pytest.mark.parametrize("options, message", [
    (dict(route="knn"), "route must be one of gates, mean_activation"),
    (dict(route="mean_activation"), "trains no gates; set gate_steps: 0"),
    (dict(route="mean_activation", gate_steps=0, mean_samples=0), "mean_samples must be >= 1"),
    (dict(gate_negatives="other"), "gate_negatives must be one of none, general"),
    (dict(gate_negatives="general", gate_steps=0), "needs route: gates and gate_steps > 0"),
    (dict(gate_negatives="general", negative_weight=-1.0), "negative_weight must be >= 0"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        RoutingCL(ExpertSetup(["up_proj"]), **options)


def test_gate_negatives_add_the_first_general_task_to_the_gate_phase():
    method = RoutingCL(ExpertSetup(["up_proj"]), gate_negatives="general")
    expert, gate = method.phases(2, 4)
    assert expert.tasks is None and gate.tasks == [2, -1]
    assert RoutingCL(ExpertSetup(["up_proj"])).phases(2, 4)[1].tasks is None  # the paper: its own task only


# ---------------------------------------------------------------------------- the gate stage with negatives
def test_negatives_are_gated_without_gradient_and_pushed_closed():
    torch.manual_seed(0)
    d = 10
    router = PostHocGateRouter(d)
    router.add_expert("e0")
    with torch.no_grad():
        router.gates["e0"].normal_()
    router.train_on("e0", gate=True)
    x = torch.randn(3, 5, d)
    mask = torch.ones(3, 5)
    mask[2, :2] = 0  # padding of the negative sample
    negative = torch.tensor([False, True, True])
    routing = router(x, RoutingContext(token_mask=mask, extra={"negative": negative}))
    v = router.gates["e0"]
    logit = x @ v.detach()
    torch.testing.assert_close(routing.weights[..., 0], torch.sigmoid(logit))  # the forward is the gate's
    tokens = mask.bool() & negative[:, None]
    closing = -torch.log(1 - torch.sigmoid(logit))  # (B, L)
    want = (closing[1][tokens[1]].mean() + closing[2][tokens[2]].mean()) / 3  # per negative sample, over 3 samples
    torch.testing.assert_close(router.negative_loss, want)
    # The weights of the negative samples carry no gradient to the gate; the positive sample's do.
    (routing.weights[1:].sum()).backward(retain_graph=True)
    assert v.grad is None or not v.grad.any()
    routing.weights[0].sum().backward(retain_graph=True)
    assert v.grad.abs().sum() > 0
    v.grad = None
    router.negative_loss.backward()  # d/dv softplus(x.v) = sigmoid(x.v) x, averaged as the loss is
    grad = [(torch.sigmoid(logit[b][tokens[b]])[:, None] * x[b][tokens[b]]).mean(0) for b in (1, 2)]
    torch.testing.assert_close(v.grad, (grad[0] + grad[1]) / 3)


def test_without_negatives_the_gate_stage_is_the_papers():
    router = PostHocGateRouter(4)
    router.add_expert("e0")
    router.train_on("e0", gate=True)
    x = torch.randn(2, 3, 4)
    routing = router(x, RoutingContext())
    assert router.negative_loss is None
    torch.testing.assert_close(routing.weights[..., 0], torch.sigmoid(x @ router.gates["e0"]).detach())


# -------------------------------------------------------------------------------------------- micro runs
def _prompt_inputs(model, layer_name: str, batch: dict) -> torch.Tensor:
    """One unpadded sample: the named layer's input at its prompt tokens, standardized, from the base alone."""
    seen = []
    layer = expert_layers(model)[layer_name]
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with routing_context(model, RoutingContext(disable_adapters=True)):
            model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch.get("pixel_values"))
    finally:
        handle.remove()
    answer = (batch["labels"][0] != -100).nonzero()[0, 0]  # the first answer token
    return _standardize(seen[0][0, :answer].double())


def test_the_stored_means_are_each_samples_prompt_mean_averaged(fit_general, tmp_path):
    run = tmp_path / "run"
    results = fit_general(run, "routing", *MEAN, "--model.method.init_args.mean_samples", "5",
                          "--model.method.init_args.null_expert", "true")
    restored = restore(run, 2)
    module, dm = restored.module, restored.datamodule
    means = module.method.means
    assert means.num_tasks == 2
    names = list(expert_layers(module.model))
    for task in (0, 1, -1):  # -1: the general task's, the base choice
        data = dm.train_dataset(task)
        for name in (names[0], names[-1]):
            rows = [_prompt_inputs(module.model, name, dm.train_collate([data[i]])).mean(0) for i in range(5)]
            stored = means.means[name][task] if task >= 0 else means.base[name]
            torch.testing.assert_close(stored.double(), torch.stack(rows).mean(0), atol=1e-5, rtol=1e-4)
    # every evaluation after the first task reports the choice of each trained task's test prompts
    metrics = results["method_metrics"]
    assert set(metrics["stage_01"]["mean_activation_accuracy"]) == {"colour"}
    assert set(metrics["stage_02"]["mean_activation_accuracy"]) == {"colour", "mood"}
    confusion = metrics["stage_02"]["mean_activation_confusion"]
    assert sum(confusion["colour"].values()) == sum(confusion["mood"].values()) == 3
    assert "mean_activation_general_to_base" in metrics["stage_02"]  # the general task's 3 rows


def test_the_chosen_task_serves_every_layer(fit_general, tmp_path):
    """With the means of two tasks, evaluating a sample gives what its chosen task's expert alone gives."""
    run = tmp_path / "run"
    fit_general(run, "routing", *MEAN)
    restored = restore(run, 2)
    module, dm = restored.module, restored.datamodule
    method = module.method
    batch = next(iter(dm.test_dataloader(1)))
    context = method.routing_context(batch, training=False)
    chosen = context.task_ids
    with routing_context(module.model, context):
        got = module.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
    for b, t in enumerate(chosen.tolist()):
        with routing_context(module.model, RoutingContext(task_ids=torch.tensor([t]), router_choice=["task_id"])):
            one = module.model(batch["input_ids"][b:b + 1], attention_mask=batch["attention_mask"][b:b + 1],
                               pixel_values=batch["pixel_values"][b:b + 1]).logits
        torch.testing.assert_close(got[b:b + 1], one, atol=1e-5, rtol=1e-4)


def _mean_gate_on(module, dm, task: int, data_index: int) -> float:
    """Task ``task``'s gate, sigmoid(v . x), averaged over the real tokens of the data's training samples and
    over the expert layers, with every layer routed to that task's expert alone (the gate stage's forward)."""
    layers = expert_layers(module.model)
    values = []
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, name=name: values.append((args[0], layers[name].routers["default"].gates[f"task{task}"])))
        for name, layer in layers.items()]
    batch = dm.train_collate([dm.train_dataset(data_index)[i] for i in range(8)])
    for layer in layers.values():
        layer.routers["default"].train_on(f"task{task}")  # the expert stage's routing: that expert alone
    try:
        with torch.no_grad(), routing_context(module.model, RoutingContext()):
            module.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"])
    finally:
        for layer in layers.values():
            layer.routers["default"].route()
        for h in hooks:
            h.remove()
    mask = batch["attention_mask"].bool()
    return float(torch.stack([torch.sigmoid(x @ v)[mask].mean() for x, v in values]).mean())


def test_gate_negatives_close_the_gates_on_the_general_task(fit_general, tmp_path):
    gates = {}
    for name, extra in (("paper", []), ("negatives", ["--model.method.init_args.gate_negatives", "general",
                                                        "--model.method.init_args.negative_weight", "5"])):
        fit_general(tmp_path / name, "routing", *GATES, *extra)
        restored = restore(tmp_path / name, 1)
        general = -1  # the first general task's training samples
        gates[name] = (_mean_gate_on(restored.module, restored.datamodule, 0, general),
                       _mean_gate_on(restored.module, restored.datamodule, 0, 0))
    (paper_general, _paper_own), (neg_general, neg_own) = gates["paper"], gates["negatives"]
    assert neg_general < paper_general - 0.1 and neg_general < 0.3, gates
    assert neg_own > neg_general, gates  # still open more on its own task's tokens than on the general task's


def test_the_gate_phase_trains_on_the_general_task_too(fit_general, tmp_path):
    results = fit_general(tmp_path / "run", "routing", *GATES, "--model.method.init_args.gate_negatives", "general")
    assert [list(t["phases"]) for t in results["timings"]["tasks"]] == [["expert", "gate"], ["expert", "gate"]]


def test_the_phase_names_its_general_task_when_the_run_has_none(fit_general, tmp_path, general_bench):
    configs = Path(__file__).resolve().parents[2] / "configs"
    with pytest.raises(IndexError, match=r"general task 0 \(task index -1\) but data.general names 0"):
        fit_main(["--config", str(configs / "micro.yaml"), "--config", str(configs / "methods/routing.yaml"),
                  "--data.benchmark", str(general_bench), "--data.order", "[colour, mood]",
                  "--trainer.default_root_dir", str(tmp_path / "run"), *GATES,
                  "--model.method.init_args.gate_negatives", "general"])
