"""The KV-cache keyword: read from the forward signature of the model being called."""

import pytest
import torch
from torch import nn

from mllm_cl.backbones import build_preset
from mllm_cl.backbones.kv_cache import cache_keyword, cache_kwargs, take_cache


class NewStyle(nn.Module):  # transformers releases that renamed the argument
    def forward(self, inputs_embeds=None, attention_mask=None, labels=None, cache=None, **kwargs):
        return cache


class OldStyle(nn.Module):  # transformers 4.56 .. the rename
    def forward(self, inputs_embeds=None, attention_mask=None, labels=None, past_key_values=None, **kwargs):
        return past_key_values


@pytest.mark.parametrize("cls,name", [(NewStyle, "cache"), (OldStyle, "past_key_values")])
def test_the_keyword_follows_the_signature(cls, name):
    model, cache = cls(), object()
    assert cache_keyword(model) == name
    assert model(**cache_kwargs(model, cache)) is cache
    assert cache_kwargs(model, None) == {}


def test_take_cache_accepts_either_name_once():
    a = object()
    assert take_cache({"cache": a}) is a and take_cache({"past_key_values": a}) is a
    kwargs = {"cache": a, "use_cache": True}
    take_cache(kwargs)
    assert kwargs == {"use_cache": True}
    with pytest.raises(ValueError, match="not both"):
        take_cache({"cache": a, "past_key_values": a})


def test_installed_transformers_gets_the_name_its_models_take():
    """The real language model of a preset: its forward names exactly one of the two."""
    import inspect

    llm = build_preset("tiny-clip-llama").model.language_model
    params = inspect.signature(type(llm).forward).parameters
    assert (cache_keyword(llm) in params) and (("cache" in params) != ("past_key_values" in params))


@pytest.mark.parametrize("cls", [NewStyle, OldStyle])
def test_composed_backbone_hands_the_cache_on(cls):
    """ComposedMLLM passes the cache to its language model under that model's own name, given either."""
    backbone = build_preset("tiny-clip-llama").model
    seen = {}

    class Recorder(cls):
        def forward(self, *args, **kwargs):
            seen.update(kwargs)
            return None

    backbone.language_model = Recorder()
    backbone.language_model.get_input_embeddings = lambda: nn.Embedding(512, 4)

    class Cache:
        def get_seq_length(self):
            return 1  # decoding: the embeddings come from the token ids alone

    for given in ("cache", "past_key_values"):
        seen.clear()
        backbone(torch.tensor([[5]]), **{given: Cache()})
        assert set(seen) & {"cache", "past_key_values"} == {cache_keyword(Recorder())}
