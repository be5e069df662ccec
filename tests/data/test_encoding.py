"""Templates, image-token expansion, label masks and truncation."""

import pytest

from mllm_cl.backbones import build_preset
from mllm_cl.data.encoding import IGNORE, ConversationEncoder
from mllm_cl.data.errors import BadSampleError
from mllm_cl.data.formats import Conversation
from mllm_cl.data.template import VICUNA_SYSTEM


@pytest.fixture(scope="module")
def backbone():
    return build_preset("tiny-clip-llama")


MULTI = Conversation("m", None, [("user", "<image>\nWhat colour?"), ("assistant", "red"),
                                 ("user", "Sure?"), ("assistant", "yes")], source="f.json, record 0")


def _spans(labels):
    """Runs of consecutive trained positions."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        if label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_vicuna_multi_turn_text_and_label_mask(backbone):
    tok = backbone.tokenizer
    enc = ConversationEncoder(tok, num_image_tokens=backbone.model.num_image_tokens, template="vicuna_v1")
    out = enc.encode_conversation(MULTI)
    image = tok.image_token_id
    assert out.input_ids.count(image) == backbone.model.num_image_tokens == 16
    text = tok.decode([t for t in out.input_ids if t != image])
    assert text == (f"<s>{VICUNA_SYSTEM} USER: \nWhat colour? ASSISTANT: red</s>USER: Sure? ASSISTANT: yes</s>")
    spans = _spans(out.labels)
    assert [tok.decode(out.input_ids[a:b]) for a, b in spans] == [" red</s>", " yes</s>"]
    assert all(out.labels[i] == out.input_ids[i] for a, b in spans for i in range(a, b))


def test_prompt_ends_with_the_generation_prompt(backbone):
    tok = backbone.tokenizer
    enc = ConversationEncoder(tok, num_image_tokens=16, template="short")
    ids = enc.encode_prompt("<image>\nWhat shape?")
    assert tok.decode([t for t in ids if t != tok.image_token_id]) == "<s>USER: \nWhat shape? ASSISTANT:"
    assert ids.count(tok.image_token_id) == 16


def test_truncation_never_cuts_image_tokens(backbone):
    tok = backbone.tokenizer
    long_answer = Conversation("l", None, [("user", "<image>\nDescribe."), ("assistant", "word " * 50)], "f, record 1")
    full = ConversationEncoder(tok, num_image_tokens=16, template="short").encode_conversation(long_answer)
    cut = ConversationEncoder(tok, num_image_tokens=16, template="short",
                              max_length=60).encode_conversation(long_answer)
    assert len(cut.input_ids) == 60 and cut.input_ids == full.input_ids[:60]
    assert cut.labels[-1] != IGNORE  # the answer is cut, not the image
    with pytest.raises(BadSampleError, match="f, record 1: too long: image tokens end after max_length 10"):
        ConversationEncoder(tok, num_image_tokens=16, template="short", max_length=10).encode_conversation(long_answer)
    with pytest.raises(BadSampleError, match="the first answer starts after max_length 30"):
        ConversationEncoder(tok, num_image_tokens=16, template="short", max_length=30).encode_conversation(long_answer)


def test_the_tokenizers_own_chat_template():
    tok = build_preset("tiny-clip-llama").tokenizer  # a fresh copy: the module fixture stays untouched
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    enc = ConversationEncoder(tok, num_image_tokens=4, template="hf")
    out = enc.encode_conversation(MULTI)
    assert out.input_ids.count(tok.image_token_id) == 4
    assert [tok.decode(out.input_ids[a:b]) for a, b in _spans(out.labels)] == ["red</s>", "yes</s>"]
    prompt = enc.encode_prompt("<image>\nWhat colour?")
    assert tok.decode([t for t in prompt if t != tok.image_token_id]).endswith("What colour?<|assistant|>")


def test_unknown_template_and_missing_chat_template(backbone):
    with pytest.raises(ValueError, match="unknown chat template 'llama9'"):
        ConversationEncoder(backbone.tokenizer, num_image_tokens=16, template="llama9")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        ConversationEncoder(backbone.tokenizer, num_image_tokens=16, template="hf")


@pytest.mark.parametrize("name", ["tiny-clip-llama", "tiny-base"])
def test_the_fast_backend_gives_the_wrappers_ids(name):
    from mllm_cl.backbones import build_backbone

    tok = build_backbone(name).tokenizer
    fast = ConversationEncoder(tok, num_image_tokens=4, template="vicuna_v1")
    assert fast._backend is not None
    slow = ConversationEncoder(tok, num_image_tokens=4, template="vicuna_v1")
    slow._backend = None  # the transformers wrapper, segment by segment
    conv = Conversation("u", None, [("user", "<image>\nWhat  is written? wörld ß 漢字 </s> <s>"),
                                    ("assistant", " Fiction."), ("user", "And\tthen?"),
                                    ("assistant", "[0.12, 0.20, 0.58, 0.64]")], "f, record 2")
    assert fast.encode_conversation(conv) == slow.encode_conversation(conv)
    prompt = "<image>\nTest question 0 about RS?"
    assert fast.encode_prompt(prompt) == slow.encode_prompt(prompt)
