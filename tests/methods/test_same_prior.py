"""SAME's task prior against a reference written from the authors' code, on random tensors.

The reference functions below are a plain-torch reading of the authors' public code
(``RouterIntegration`` in ``method/custom/specialized_integration.py`` and ``SAMELinear``
in ``PEFT/tuners/custom/same.py`` of LAMDA-CL's Prism / EMNLP2026-CRAM), one evaluation
sample per batch as their inference runs it (batch size 1).
"""

import pytest
import torch
import torch.nn.functional as F
from two_processes import spawn_two

from mllm_cl.backbones import build_preset
from mllm_cl.experts import BatchMeanRouter, ExpertSetup, RoutingContext, expert_layers
from mllm_cl.methods import SAME
from mllm_cl.methods.routing_encoder import RoutingFeatures
from mllm_cl.system.run_dir import RunDir

D, E = 24, 4


# ------------------------------------------------------------- the reference
def ref_anchor_update(anchor, count, feats):
    """Running mean over training batches: (old * count + sum) / (count + batch)."""
    return (anchor * count + feats.sum(0)) / (count + feats.shape[0]), count + feats.shape[0]


def ref_prior(image, text, image_anchors, text_anchors, *, scale=28.0, w=0.2):
    """One sample: cosine to every task's anchors, 0.2 image + 0.8 text (text only without image), softmax(28 s)."""
    text_sims = torch.stack([F.cosine_similarity(text[None], a[None], dim=1).max() for a in text_anchors])
    if image is None:
        return F.softmax(text_sims * scale, dim=0)
    image_sims = torch.stack([F.cosine_similarity(image[None], a[None], dim=1).max() for a in image_anchors])
    return F.softmax((w * image_sims + (1 - w) * text_sims) * scale, dim=0)


def ref_eval_routing(router_logits, prior, k=2):
    """Evaluation: softmax(logits / E) averaged over the sample's tokens, times the prior, top-2 renormalized."""
    e = router_logits.shape[-1]
    probs = F.softmax(router_logits / e, dim=-1).mean(0) * prior
    probs = probs / (probs.sum() + 1e-8)
    vals, idx = torch.topk(probs, k)
    out = torch.zeros_like(probs)
    out[idx] = vals
    return out / (out.sum() + 1e-8)


def ref_train_routing(router_logits, masks, current):
    """Training: softmax averaged over every position of the micro-batch, masked, renormalized."""
    mean = F.softmax(router_logits.reshape(-1, router_logits.shape[-1]), dim=-1).mean(0)
    masked = mean * masks
    if masked.sum() == 0:
        masked[current] = 1.0
    return masked / masked.sum()


# ------------------------------------------------------------------ helpers
def _method(**kwargs):
    backbone = build_preset("tiny-clip-llama", seed=0)
    method = SAME(ExpertSetup(["up_proj"], rank=2), num_experts=E, **kwargs)
    method.tokenizer = backbone.tokenizer
    method.build(backbone.model)
    return method, backbone.model


def _feats(n, dim, seed, has_image=None):
    g = torch.Generator().manual_seed(seed)
    has = torch.ones(n, dtype=torch.bool) if has_image is None else has_image
    image = torch.randn(n, dim, generator=g) * has[:, None]
    return RoutingFeatures(image=image, text=torch.randn(n, dim, generator=g), has_image=has)


def _train_task(method, model, task, feats_list):
    method.on_task_start(model, task)
    for feats in feats_list:
        method._accumulate(torch.full((feats.text.shape[0],), task), feats)
    method.on_task_end(model, task)


# -------------------------------------------------------------------- tests
def test_anchors_and_prior_equal_the_reference():
    method, model = _method()
    dim = method.routing_encoder.image_dim
    batches = {t: [_feats(5, dim, 10 * t + i) for i in range(3)] for t in range(3)}
    for t in range(3):
        _train_task(method, model, t, batches[t])
    anchors = {}
    for t in range(3):  # the authors' running mean, from an empty anchor
        img, n_img = torch.zeros(dim, dtype=torch.float64), 0
        txt, n_txt = torch.zeros(dim, dtype=torch.float64), 0
        for f in batches[t]:
            img, n_img = ref_anchor_update(img, n_img, f.image.double())
            txt, n_txt = ref_anchor_update(txt, n_txt, f.text.double())
        anchors[t] = (img.float(), txt.float())
    probe = _feats(6, dim, 99, has_image=torch.tensor([True, True, False, True, False, True]))
    ours = method.task_prior(probe)
    for b in range(6):
        image = probe.image[b] if probe.has_image[b] else None
        ref = ref_prior(image, probe.text[b], [anchors[t][0] for t in range(3)], [anchors[t][1] for t in range(3)])
        torch.testing.assert_close(ours[b], ref, atol=1e-5, rtol=1e-5)
    # Expert t carries task t's prior; the unseen fourth expert none.
    torch.testing.assert_close(method.expert_prior(ours), torch.cat([ours, torch.zeros(6, 1)], dim=1))


def test_evaluation_weights_equal_the_reference():
    router = BatchMeanRouter(D).eval()
    for i in range(E):
        router.add_expert(f"e{i}")
    x = torch.randn(3, 7, D)
    prior = torch.softmax(torch.randn(3, E) * 5, -1)
    routing = router(x, RoutingContext(token_mask=torch.ones(3, 7), extra={"prior": prior}))
    dense = routing.dense(E)[:, 0]  # (B, E)
    for b in range(3):
        ref = ref_eval_routing(x[b] @ router.weight().T, prior[b])
        torch.testing.assert_close(dense[b], ref, atol=1e-6, rtol=1e-5)


def test_masked_training_routing_equals_the_reference():
    router = BatchMeanRouter(D)
    for i in range(E):
        router.add_expert(f"e{i}")
    x = torch.randn(2, 5, D)
    router.masked = {"e0", "e2"}
    routing = router(x, RoutingContext(extra={"attention_mask": torch.ones(2, 5)}))  # train_tokens: all
    ref = ref_train_routing(x @ router.weight().T, torch.tensor([0.0, 1.0, 0.0, 1.0]), current=1)
    torch.testing.assert_close(routing.dense(E).flatten(), ref)
    router.masked = {"e0", "e2", "e3"}  # every other expert masked: one-hot, the router gets no gradient
    routing = router(x, RoutingContext(extra={"attention_mask": torch.ones(2, 5)}))
    assert routing.dense(E).flatten().tolist() == [0.0, 1.0, 0.0, 0.0]


def test_separated_anchors_send_a_sample_to_its_tasks_expert():
    method, model = _method()
    dim = method.routing_encoder.image_dim
    base = _feats(8, dim, 0)
    for t, sign in ((0, 1.0), (1, -1.0)):  # two tasks on opposite sides of the feature space
        shifted = RoutingFeatures(image=base.image + sign * 5, text=base.text + sign * 5, has_image=base.has_image)
        _train_task(method, model, t, [shifted])
    sample = RoutingFeatures(image=torch.full((1, dim), 5.0), text=torch.full((1, dim), 5.0),
                             has_image=torch.tensor([True]))
    prior = method.task_prior(sample)
    assert prior[0, 0] > 0.999 and prior[0, 1] < 1e-3
    router = BatchMeanRouter(D).eval()
    for i in range(E):
        router.add_expert(f"e{i}")
    routing = router(torch.randn(1, 6, D), RoutingContext(extra={"prior": method.expert_prior(prior)}))
    weights = routing.dense(E).flatten()
    assert int(weights.argmax()) == 0 and weights[0] > 0.99


def test_prior_none_routes_as_before_and_collects_nothing():
    method, model = _method(prior="none")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "task_ids": torch.zeros(2, dtype=torch.long), "has_image": torch.tensor([True, False])}
    method.on_task_start(model, 0)
    assert method.routing_context(batch, training=False) is None  # evaluation as without the prior
    method.routing_context(batch, training=True)
    method.on_task_end(model, 0)
    assert method.anchors == {} and method.stage_metrics(["a"]) is None


def test_prior_accuracy_is_a_stage_metric():
    method, model = _method()
    dim = method.routing_encoder.image_dim
    for t in range(2):
        _train_task(method, model, t, [_feats(4, dim, t)])
    left = _feats(3, dim, 0)  # task 0's own samples: the prior finds them
    method._count_hits(torch.zeros(3, dtype=torch.long), method.task_prior(left))
    method._count_hits(torch.ones(2, dtype=torch.long), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert method.stage_metrics(["a", "b"]) == {"prior_accuracy": {"a": 100.0, "b": 50.0},
                                                "prior_confusion": {"a": {"a": 3}, "b": {"a": 1, "b": 1}}}
    assert method.stage_metrics(["a", "b"]) is None  # reset after each stage: nothing scored since


def test_anchors_survive_save_and_resume_bit_exactly(tmp_path):
    method, model = _method()
    dim = method.routing_encoder.image_dim
    for t in range(2):
        _train_task(method, model, t, [_feats(5, dim, 3 + t), _feats(2, dim, 7 + t)])
    facts, tensors = method.state()
    run = RunDir(tmp_path)
    run.save_checkpoint(2, model, {"method_state": facts}, tensors)
    fresh, fresh_model = _method()
    fresh.load_state(*run.method_state(2))
    for t in range(2):  # the loop's replay of finished tasks must not change them
        fresh.on_task_start(fresh_model, t)
        fresh.on_task_end(fresh_model, t)
    assert fresh.anchors.keys() == method.anchors.keys()
    for t in method.anchors:
        for k, v in method.anchors[t].items():
            assert torch.equal(fresh.anchors[t][k].to(v), v), (t, k)


def _ddp_worker(rank, out):
    method, model = _method()
    feats = _feats(10, method.routing_encoder.image_dim, 5)
    half = slice(5 * rank, 5 * rank + 5)
    part = RoutingFeatures(image=feats.image[half].double(), text=feats.text[half].double(),
                           has_image=feats.has_image[half])
    _train_task(method, model, 0, [part])
    torch.save(method.anchors, f"{out}/anchors{rank}.pt")


def test_anchors_under_two_processes_equal_one_process(tmp_path):
    method, model = _method()
    feats = _feats(10, method.routing_encoder.image_dim, 5)
    _train_task(method, model, 0, [RoutingFeatures(image=feats.image.double(), text=feats.text.double(),
                                                   has_image=feats.has_image)])
    spawn_two(_ddp_worker, str(tmp_path), store=tmp_path / "store")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"anchors{rank}.pt")
        for k, v in method.anchors[0].items():
            torch.testing.assert_close(got[0][k], v, atol=1e-12, rtol=1e-12, msg=k)


def test_options_are_checked():
    for key, value in (("prior", "maybe"), ("expert_init", "zeros"), ("ema_init", "never"), ("train_tokens", "some")):
        with pytest.raises(ValueError, match=f"same: {key} must be one of"):
            SAME(ExpertSetup(["up_proj"]), **{key: value})


def test_authors_initialization_and_ema_start():
    method, model = _method()
    method.on_task_start(model, 0)
    layer = next(iter(expert_layers(model).values()))
    A = torch.cat([e.A.detach().flatten() for e in layer.experts.values()])
    assert (abs(float(A.detach().std()) - 0.01) < 0.002
            and all(float(e.B.detach().abs().sum()) == 0 for e in layer.experts.values()))
    assert torch.allclose(layer.same.utilization, torch.full((E,), 1 / E, dtype=torch.float64))
    assert torch.allclose(layer.same.importance, torch.full((E,), 1 / E, dtype=torch.float64))
