"""Evaluation generation: equals transformers' generate, and answers do not depend on the batch."""

import pytest
import torch
from mllm_cl.data_modules import TaskSequence
from torch import nn

from mllm_cl.backbones import build_preset
from mllm_cl.data.images import ImageProcessor
from mllm_cl.data.synth import generate as synth
from mllm_cl.eval.evaluate import predict
from mllm_cl.eval.generation import greedy_generate
from mllm_cl.experts import ExpertSetup, RoutingContext, SequenceTopKRouter, TopKRouter, expert_layers

ROUTERS = {"token_top2": lambda d: TopKRouter(d, top_k=2), "sequence_top2": lambda d: SequenceTopKRouter(d, top_k=2)}


@pytest.fixture(scope="module", params=list(ROUTERS))
def routed_model(request):
    """A tiny model with a pool of randomized experts, routed per token or per whole prompt."""
    backbone = build_preset("tiny-clip-llama", seed=2)
    ExpertSetup(["q_proj", "v_proj", "up_proj"], rank=4, router=ROUTERS[request.param],
                initial_experts=["a", "b", "c"]).apply(backbone.model)
    for layer in expert_layers(backbone.model).values():
        for e in layer.experts.values():
            nn.init.normal_(e.B, std=0.3)
    backbone.model.eval()
    return backbone


def test_greedy_generate_matches_transformers_generate(routed_model):
    model, tok = routed_model.model, routed_model.tokenizer
    if isinstance(next(iter(expert_layers(model).values())).routers["default"], SequenceTopKRouter):
        pytest.skip("transformers' generate re-routes whole-prompt routers on every decoded token; "
                    "greedy_generate keeps the prefill weights, so the two differ by design")
    n = model.num_image_tokens
    rows = [[1] + [tok.image_token_id] * n + tok(" what is it?").input_ids, [1] + tok(" hi").input_ids]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (ids != tok.pad_token_id).long()
    pixels = torch.randn(1, 3, 32, 32)
    eos = tok.eos_token_id
    ours = greedy_generate(model, ids, mask, pixels, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    theirs = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=10, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_answers_do_not_depend_on_batch_size_or_neighbours(routed_model, tmp_path):
    synth(tmp_path, tasks=["color", "count"], train_size=2, test_size=9, progress=False)
    model, tok = routed_model.model, routed_model.tokenizer
    answers = {}
    for batch_size in (1, 4, 9):
        dm = TaskSequence(benchmark=str(tmp_path), template="short", eval_batch_size=batch_size)
        dm.connect(tok, ImageProcessor.for_model(model), model.num_image_tokens)
        rows = [r for i in range(2) for r in predict(model, tok, dm.test_dataloader(i), max_new_tokens=6,
                                                       context=lambda b: None)]
        answers[batch_size] = [(r["question_id"], r["text"]) for r in rows]
    assert answers[1] == answers[4] == answers[9]
    assert len({t for _, t in answers[1]}) > 1  # not one constant answer: the comparison means something


def test_whole_prompt_routing_is_computed_at_prefill_and_kept_while_decoding(routed_model):
    model, tok = routed_model.model, routed_model.tokenizer
    layers = list(expert_layers(model).values())
    if not isinstance(layers[0].routers["default"], SequenceTopKRouter):
        pytest.skip("token routing re-routes every token by design")
    rows = [[1] + tok(" what is it?").input_ids, [1] + tok(" hi there, what is it?").input_ids]
    pad = len(rows[1]) - len(rows[0])
    ids = torch.tensor([[0] * pad + rows[0], rows[1]])  # the first prompt is left-padded
    mask = (ids != 0).long()
    context = RoutingContext()
    greedy_generate(model, ids, mask, None, max_new_tokens=5, eos_token_id=-1, pad_token_id=0, context=context)
    for layer in layers:  # the last decoding step used the weights stored at prefill
        assert layer.last_routing is context.cache[("sequence_routing", id(layer.routers["default"]))]
    # ... which are those of each prompt alone, padding excluded.
    alone = RoutingContext()
    greedy_generate(model, ids[:1, pad:], mask[:1, pad:], None, max_new_tokens=5, eos_token_id=-1, pad_token_id=0,
                    context=alone)
    key = ("sequence_routing", id(layers[0].routers["default"]))
    torch.testing.assert_close(context.cache[key].weights[:1], alone.cache[key].weights)


def test_evaluation_passes_transformers_what_it_expects(routed_model, tmp_path, no_future_warnings):
    """The KV cache goes to the language model under the name the installed transformers takes
    (``cache``, or ``past_key_values`` before the rename): no deprecation on any evaluation batch."""
    synth(tmp_path, tasks=["color"], train_size=2, test_size=4, progress=False)
    model, tok = routed_model.model, routed_model.tokenizer
    dm = TaskSequence(benchmark=str(tmp_path), template="short", eval_batch_size=2)
    dm.connect(tok, ImageProcessor.for_model(model), model.num_image_tokens)
    rows = predict(model, tok, dm.test_dataloader(0), max_new_tokens=4, context=lambda b: None)
    assert len(rows) == 4
