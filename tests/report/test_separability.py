"""The separability diagnosis on a micro routing-CL run, against a hand computation in plain torch."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.cli import main as cli_main
from mllm_cl.data.encoding import IGNORE
from mllm_cl.data.formats import Conversation
from mllm_cl.experts import ExpertLayer, PostHocGateRouter, SequenceTopKRouter, expert_layers
from mllm_cl.methods.base import Method
from mllm_cl.report.routing import diagnose, load_predictions, markdown
from mllm_cl.report.separability import ROUTINGS, Spread, measure, separation_ratio, skip_reason
from mllm_cl.system.restore import restore


def test_separation_ratio_of_two_tasks_with_known_means_and_spreads():
    # task 0: (1, 0), (3, 0): mean (2, 0), mean squared distance 1; task 1: (0, 1), (0, 3): mean (0, 2), 1.
    # mean of the means (1, 1); between = sqrt(mean(2, 2)) = sqrt(2), within = sqrt(mean(1, 1)) = 1.
    spread = Spread(3, 2)  # a third task without tokens is left out
    spread.add(0, torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    spread.add(1, torch.tensor([[0.0, 1.0]]))
    spread.add(1, torch.tensor([[0.0, 3.0]]))
    assert spread.ratio() == pytest.approx(math.sqrt(2), abs=1e-12)
    # unequal counts: the task means weigh equally. Task 1 with 4 tokens around (0, 4) at distance 2.
    sums = torch.tensor([[4.0, 0.0], [0.0, 16.0]])
    squares = torch.tensor([1.0 + 9.0, 4.0 + 36.0 + 2 * (16.0 + 4.0)])  # (0,2),(0,6),(2,4),(-2,4)
    counts = torch.tensor([2.0, 4.0])
    # means (2, 0), (0, 4); within: task 0 1, task 1 4 -> sqrt(2.5); between: sqrt(|(1, -2)|^2) = sqrt(5)
    assert separation_ratio(sums, squares, counts) == pytest.approx(math.sqrt(5) / math.sqrt(2.5), abs=1e-12)
    assert separation_ratio(sums[:1], squares[:1], counts[:1]) is None  # one task: no ratio


def test_no_diagnosis_without_token_level_routing_over_own_experts():
    class Stub:
        task_experts = Method.task_experts

    layer = ExpertLayer(nn.Linear(4, 4), router=SequenceTopKRouter(4))
    layer.add_expert("task0")
    assert "per token" in skip_reason(Stub(), {"l": layer}, [0], ["a"])
    gated = ExpertLayer(nn.Linear(4, 4), router=PostHocGateRouter(4))
    gated.add_expert("task0")
    assert skip_reason(Stub(), {"l": gated}, [0], ["a"]) is None
    assert "b has no expert" in skip_reason(Stub(), {"l": gated}, [0, 1], ["a", "b"])
    diag = {"method": "m", "stage": 1, "prompts_per_task": 3, "summary": {}, "choice": {},
            "separability_note": "its routing is per sample or per batch, not per token"}
    assert "Not diagnosed: its routing is per sample or per batch, not per token." in markdown(diag)


def _samples(dm, t, n):
    """(input ids, pixels, index of the first answer token) of task t's first n test samples, teacher-forced."""
    data = dm.test_dataset(t)
    out = []
    for i in range(n):
        rec, item = data.items[i], data[i]
        enc = data.encoder.encode_conversation(
            Conversation(rec.question_id, rec.image, [("user", rec.prompt), ("assistant", rec.answer)]))
        first = next(k for k, label in enumerate(enc.labels) if label != IGNORE)
        assert enc.input_ids[:first] == item["input_ids"]  # the evaluation prompt, then the reference answer
        out.append((torch.tensor(enc.input_ids), item["pixel_values"], first))
    return out


def _forward(model, ids, pixels):
    n = ids.numel()
    return model(ids[None], attention_mask=torch.ones(1, n, dtype=torch.long), pixel_values=pixels[None],
                 position_ids=torch.arange(n)[None], use_cache=False).logits[0]


def test_ratio_and_accuracies_match_a_hand_computation(run):
    restored = restore(run)
    diag = diagnose(restored, load_predictions(run, restored.stage), limit=3)
    module, dm = restored.module, restored.datamodule
    model, layers = module.model, expert_layers(module.model)
    assert diag["separability_note"] is None and set(diag["separation"]) == set(layers)
    assert all(isinstance(layer.routers["default"], PostHocGateRouter) for layer in layers.values())  # put back
    watched = [next(iter(layers)), list(layers)[-1]]
    tokens = {(name, span): [] for name in watched for span in ("prompt", "answer", "all")}
    for t, task in enumerate(dm.task_names):
        hits = {"gates": 0, "own": 0}
        total = 0
        for ids, pixels, first in _samples(dm, t, 3):
            inputs = {}
            hooks = [layers[name].register_forward_pre_hook(
                lambda m, a, name=name, inputs=inputs: inputs.__setitem__(name, a[0][0])) for name in watched]
            with torch.no_grad():
                gates = _forward(model, ids, pixels)
            for h in hooks:
                h.remove()
            for name in watched:  # standardized per token, no affine
                x = F.layer_norm(inputs[name].double(), (inputs[name].shape[-1],))
                tokens[name, "prompt"].append((t, x[:first]))
                tokens[name, "answer"].append((t, x[first:]))
                tokens[name, "all"].append((t, x))
            try:  # every token to task t's expert alone, weight 1: the expert phase's routing
                for layer in layers.values():
                    layer.routers["default"].train_on(f"task{t}")
                with torch.no_grad():
                    own = _forward(model, ids, pixels)
            finally:
                for layer in layers.values():
                    layer.routers["default"].route()
            target = ids[first:]
            hits["gates"] += int((gates[first - 1:-1].argmax(-1) == target).sum())
            hits["own"] += int((own[first - 1:-1].argmax(-1) == target).sum())
            total += target.numel()
        assert diag["answer_tokens"][task] == total
        for routing in ("gates", "own"):
            assert diag["answer_accuracy"][routing][task] == pytest.approx(hits[routing] / total, abs=1e-5), \
                (routing, task)
    for routing in ROUTINGS:
        acc = diag["answer_accuracy"][routing]
        assert acc["mean"] == pytest.approx((acc["colour"] + acc["mood"]) / 2, abs=1e-5)
    for (name, span), parts in tokens.items():
        by_task = [torch.cat([x for t, x in parts if t == task]) for task in (0, 1)]
        means = [x.mean(0) for x in by_task]
        within = torch.stack([(x - mu).square().sum(-1).mean() for x, mu in zip(by_task, means, strict=True)])
        within = within.mean().sqrt()
        centre = torch.stack(means).mean(0)
        between = torch.stack([(mu - centre).square().sum() for mu in means]).mean().sqrt()
        assert diag["separation"][name][span] == pytest.approx(float(between / within), abs=1e-5), (name, span)
    # one task, one expert: every routing is the same and there is no ratio
    first = diagnose(restore(run, 1), load_predictions(run, 1), limit=3)
    accs = [first["answer_accuracy"][r]["colour"] for r in ROUTINGS]
    assert accs == [accs[0]] * 4
    assert all(v == {"prompt": None, "answer": None, "all": None} for v in first["separation"].values())


def test_the_oracle_routes_per_sample_and_is_not_diagnosed(run):
    restored = restore(run, overrides=["--model.method.init_args.route_by", "task_id"])
    out = measure(restored.module, restored.datamodule, [0, 1], limit=1)
    assert out["separability_note"] == "its routing is per sample or per batch, not per token"
    assert out["answer_accuracy"] is None and out["separation"] is None


def test_report_routing_writes_the_diagnosis(run):
    assert cli_main(["report", str(run), "--routing", "--limit", "2", "--no-plots"]) == 0
    saved = json.loads((run / "routing/stage_02.json").read_text())
    assert set(saved["answer_accuracy"]) == set(ROUTINGS)
    assert set(saved["answer_accuracy"]["own"]) == {"colour", "mood", "mean"}
    assert set(saved["separation"]) == set(saved["layers"])
    assert all(set(v) == {"prompt", "answer", "all"} and v["all"] > 0 for v in saved["separation"].values())
    text = (run / "routing" / "stage_02.json").with_suffix(".md").read_text()
    assert "| task | gates | own | prompt_own | answer_own |" in text and "- prompt tokens: min " in text
