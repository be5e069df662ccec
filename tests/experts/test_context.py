"""The routing context reaches every expert layer of a model for one forward."""

import pytest
import torch
from torch import nn

from mllm_cl.backbones import build_preset
from mllm_cl.experts import ExpertSetup, FixedRouter, RoutingContext, TaskRouter, expert_layers, routing_context


@pytest.fixture()
def tiny():
    backbone = build_preset("tiny-clip-llama", seed=0)
    model = backbone.model
    n = model.num_image_tokens
    ids = torch.tensor([[1] + [4] * n + [30, 31, 32], [1] + [4] * n + [33, 34, 35]])
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    return model, ids, pixels


def _randomize(model):
    for layer in expert_layers(model).values():
        for e in layer.experts.values():
            nn.init.normal_(e.B, std=0.5)


def test_task_ids_route_each_sample_to_its_expert_in_every_layer(tiny):
    model, ids, pixels = tiny
    report = ExpertSetup(["q_proj", "down_proj"], rank=4, router=TaskRouter, initial_experts=["t0", "t1"]).apply(model)
    assert len(report.matched) == 4
    _randomize(model)
    model.eval()
    with routing_context(model, task_ids=torch.tensor([0, 1])):
        mixed = model(ids, pixel_values=pixels).logits
    # The same answer as routing everything to one expert, sample by sample.
    for layer in expert_layers(model).values():
        layer.add_router("only_t0", FixedRouter(layer.in_features, expert="t0")).add_expert("t0")
        layer.add_router("only_t1", FixedRouter(layer.in_features, expert="t1")).add_expert("t1")
    for task in (0, 1):
        for layer in expert_layers(model).values():
            layer.active_router = f"only_t{task}"
        alone = model(ids, pixel_values=pixels).logits
        torch.testing.assert_close(mixed[task], alone[task])
    assert not torch.allclose(mixed[0], alone[0])  # the experts do differ


def test_missing_signal_names_the_context(tiny):
    model, ids, pixels = tiny
    ExpertSetup(["q_proj"], rank=4, router=TaskRouter, initial_experts=["t0"]).apply(model)
    with pytest.raises(ValueError, match="task_ids"):
        model(ids, pixel_values=pixels)
    with routing_context(model, image_embeds=torch.zeros(2, 3)), pytest.raises(ValueError, match="routing_context"):
        model(ids, pixel_values=pixels)


def test_disable_adapters_gives_the_base_model(tiny):
    model, ids, pixels = tiny
    model.eval()
    base = model(ids, pixel_values=pixels).logits
    ExpertSetup(["q_proj", "v_proj", "up_proj"], rank=4, initial_experts=["e0"]).apply(model)
    _randomize(model)
    adapted = model(ids, pixel_values=pixels).logits
    with routing_context(model, disable_adapters=True):
        torch.testing.assert_close(model(ids, pixel_values=pixels).logits, base)
    assert not torch.allclose(adapted, base)


def test_contexts_nest_and_restore(tiny):
    model, _, _ = tiny
    ExpertSetup(["q_proj"], rank=4, initial_experts=["e0"]).apply(model)
    slot = next(iter(expert_layers(model).values())).slot
    assert all(layer.slot is slot for layer in expert_layers(model).values())
    outer = RoutingContext(task_ids=torch.tensor([0]))
    with routing_context(model, outer):
        with routing_context(model, disable_adapters=True) as inner:
            assert slot.current is inner
        assert slot.current is outer
    assert slot.current is None
    with pytest.raises(TypeError, match="not both"):
        with routing_context(model, outer, disable_adapters=True):
            pass


def test_subset_keeps_rows_of_every_signal():
    ctx = RoutingContext(task_ids=torch.tensor([5, 6, 7]), router_choice=["a", "b", "c"],
                         image_embeds=torch.arange(6.0).view(3, 2), extra={"ids": torch.tensor([1, 2, 3])})
    sub = ctx.subset(torch.tensor([2, 0]))
    assert sub.task_ids.tolist() == [7, 5] and sub.router_choice == ["c", "a"]
    assert sub.image_embeds.tolist() == [[4.0, 5.0], [0.0, 1.0]] and sub.extra["ids"].tolist() == [3, 1]
