"""LLaVA-CMoE's parts on hand-made inputs: load balancing, the growth rule, the task locator."""

import pytest
import torch
from torch import nn

from mllm_cl.backbones import build_preset
from mllm_cl.experts import ExpertSetup, expert_layers
from mllm_cl.methods import LLaVACMoE
from mllm_cl.methods.cmoe import balance_loss, layers_to_grow
from mllm_cl.methods.locator import TaskLocator, last_prompt_index, prompt_features


def test_balance_loss_matches_its_formula():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]])  # (1, 3 tokens, E=3)
    indices = torch.tensor([[[0, 1], [0, 1], [2, 0]]])  # top-2 slots
    # f = slots per expert / 6 = [3, 2, 1] / 6; P = column means = [1.4, 0.6, 1.0] / 3
    expected = 3 * (3 / 6 * 1.4 / 3 + 2 / 6 * 0.6 / 3 + 1 / 6 * 1.0 / 3)
    torch.testing.assert_close(balance_loss(probs, indices), torch.tensor(expected))
    # A masked token (padding) counts in neither f nor P.
    mask = torch.tensor([[True, True, False]])
    expected = 3 * (2 / 4 * 1.3 / 2 + 2 / 4 * 0.5 / 2)
    torch.testing.assert_close(balance_loss(probs, indices, mask), torch.tensor(expected))
    # Perfectly even use gives 1.
    even = torch.full((1, 2, 2), 0.5)
    torch.testing.assert_close(balance_loss(even, torch.tensor([[[0], [1]]])), torch.tensor(1.0))


def test_balance_loss_gradient_reaches_the_router_probabilities_only():
    logits = torch.randn(2, 4, 3, requires_grad=True)
    probs = logits.softmax(-1)
    balance_loss(probs, probs.topk(2, dim=-1).indices).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_growth_rule_uses_mean_minus_alpha_std():
    freqs = {"a": 0.1, "b": 0.5, "c": 0.6, "d": 0.6}  # mean 0.45, std 0.206: threshold 0.244 at alpha 1
    assert layers_to_grow(freqs, alpha=1.0) == ["b", "c", "d"]
    assert layers_to_grow(freqs, alpha=0.0) == ["b", "c", "d"]  # strictly above the mean (0.45)
    assert layers_to_grow(freqs, alpha=10.0) == ["a", "b", "c", "d"]
    assert layers_to_grow({"a": 0.3, "b": 0.3}, alpha=1.0) == []  # nothing stands out


def test_last_prompt_index_for_training_and_prompt_batches():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, -100, 7]])
    assert last_prompt_index(mask, labels).tolist() == [1, 3]
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_prompt_index(left).tolist() == [3, 3]


def test_locator_features_ignore_the_adapters_and_the_padding_side():
    backbone = build_preset("tiny-clip-llama", seed=0)
    model = backbone.model
    ExpertSetup(["up_proj"], rank=4, initial_experts=["e0"]).apply(model)
    torch.manual_seed(0)
    ids = torch.randint(10, 50, (2, 6))  # text only (the image token's id is below 10)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]), "pixel_values": None}
    base = prompt_features(model, right)
    for layer in expert_layers(model).values():
        nn.init.normal_(layer.experts["e0"].B, std=1.0)  # adapters that change every output a lot
    assert torch.equal(prompt_features(model, right), base)
    left_ids = torch.stack([torch.cat([ids[0, 4:], ids[0, :4]]), ids[1]])  # sample 0 left-padded
    left = {"input_ids": left_ids, "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]), "pixel_values": None}
    torch.testing.assert_close(prompt_features(model, left), base, atol=1e-4, rtol=1e-4)


def test_locator_picks_the_task_whose_vae_fits_best():
    torch.manual_seed(0)
    centers = [torch.zeros(16), torch.full((16,), 4.0), torch.linspace(-4, 4, 16)]
    locator = TaskLocator(hidden=32, latent=4, steps=200, lr=3e-3)
    tests = []
    for c in centers:
        locator.add_task(c + torch.randn(200, 16) * torch.linspace(0.2, 1.0, 16))
        tests.append(c + torch.randn(50, 16) * torch.linspace(0.2, 1.0, 16))
    chosen = locator.choose(torch.cat(tests))
    truth = torch.arange(3).repeat_interleave(50)
    assert (chosen == truth).float().mean() > 0.9
    assert locator.scores(tests[0]).shape == (50, 3)
    with pytest.raises(ValueError, match="need"):
        locator.add_task(torch.zeros(1, 16))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="leave experts.router"):
        LLaVACMoE(ExpertSetup(["up_proj"], initial_experts=["x"]))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        LLaVACMoE(ExpertSetup(["up_proj"]), top_k=0)
    with pytest.raises(ValueError, match="probe_fraction"):
        LLaVACMoE(ExpertSetup(["up_proj"]), probe_fraction=0)
    with pytest.raises(ValueError, match="route_by"):
        LLaVACMoE(ExpertSetup(["up_proj"]), route_by="oracle")


def test_oracle_routing_uses_the_true_task_but_scores_the_locator():
    method = LLaVACMoE(ExpertSetup(["up_proj"], rank=4), route_by="task_id", vae_hidden=8, vae_latent=2, vae_steps=5)
    backbone = build_preset("tiny-clip-llama", seed=0)
    method.build(backbone.model)
    torch.manual_seed(0)
    for _ in range(2):
        method.locator.add_task(torch.randn(8, backbone.model.language_model.config.hidden_size))
    batch = {"input_ids": torch.randint(10, 50, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long),
             "task_ids": torch.tensor([1, 0, 1])}
    context = method.routing_context(batch, training=False)
    assert context.router_choice == ["task1", "task0", "task1"]
    accuracy = method.stage_metrics(["a", "b"])["locator_accuracy"]
    assert set(accuracy) == {"a", "b"} and method.stage_metrics(["a", "b"]) is None  # reported once, then reset
