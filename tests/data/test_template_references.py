"""The encodings against references of the upstream formats, with real tokenizers trained here offline.

- ``vicuna_v1`` against LLaVA-1.5's training sample: the prompt ``conv_vicuna_v1.get_prompt()`` builds,
  tokenized as ``tokenizer_image_token`` does, masked with ``preprocess_v1``'s round-length arithmetic;
  the tokenizer a SentencePiece BPE shaped like Llama's (byte fallback, split digits, ``<unk>`` 0,
  ``<s>`` 1, ``</s>`` 2), read by the slow SentencePiece tokenizer and by ``LlamaTokenizer`` (fast),
  both with the legacy behaviour LLaVA-1.5 was trained with (a dummy prefix at the start of
  every piece of text between special tokens; the fast one, as transformers' ``Metaspace`` does, adds
  none to a piece that already starts with a space). The reference tokenizes with the tokenizer under
  test, so each is checked against LLaVA's format with its own tokens.
- ``hf`` against Qwen2-VL's fine-tuning sample: its chat template rendered whole and tokenized
  whole, a byte-level BPE with Qwen's special tokens.
- ``auto``: the template each backbone asks for.

The references are written from the formats, independently of ``mllm_cl.data``.
"""

import random

import pytest

from mllm_cl.data.encoding import IGNORE, ConversationEncoder
from mllm_cl.data.formats import Conversation

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
COLOURS = "red blue green yellow black white purple orange grey brown".split()
THINGS = "circle square star triangle car dog cat house tree boat".split()
N_IMAGE = 3  # image placeholders per image in the comparisons


def _sentences(seed: int = 0) -> list[str]:
    """A few hundred generated English sentences with the templates' words, questions and answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(300):
        colour, thing, other = rng.choice(COLOURS), rng.choice(THINGS), rng.choice(THINGS)
        out += [f"USER: What colour is the {thing}? ASSISTANT: The {thing} is {colour}.",
                f"{SYSTEM} USER: How many {thing}s are there? ASSISTANT: There are {rng.randint(0, 99)} {thing}s, "
                f"about {rng.random():.2f} kg each!",
                f"Describe the scene. A {colour} {thing} sits at [0.{rng.randint(10, 99)}, 0.{rng.randint(10, 99)}] "
                f"next to the {other}; is it {rng.choice(['yes', 'no'])}? Sure, yes: it's {rng.choice(COLOURS)}.",
                f"Where is the {thing}? Answer with the option's letter from the given choices directly. "
                f"A. left B. right ({rng.randint(1, 9)})"]
    return out


#: Conversations as the data gives them. LLaVA's loader moves a placeholder to the front of the first
#: message (``preprocess_multimodal``) before the template; the references start after that step, and
#: ``image last`` checks the image at the end of the user's text, where our loader keeps it.
CASES = {
    "image first": [("user", "<image>\nWhat colour is the star?"), ("assistant", "The star is red.")],
    "image last": [("user", "What colour is the car?\n<image>"), ("assistant", "blue")],
    "multi-turn": [("user", "<image>\nHow many dogs are there?"), ("assistant", "There are 12 dogs."),
                   ("user", "And cats?"), ("assistant", "3, about 0.25 kg each!"),
                   ("user", "Sure?"), ("assistant", "yes")],
    "numbers and punctuation": [("user", "<image>\nWhere is the boat? Give [x0, y0, x1, y1]."),
                                ("assistant", "[0.12, 0.20, 0.58, 0.64]")],
    "text only": [("user", "Describe the scene; is it green?"), ("assistant", "No: it's grey (mostly).")],
}


def _expand(ids: list[int], labels: list[int], image_id: int, n: int, wrap=([], [])) -> tuple[list, list]:
    """One image id -> ``wrap[0] + [image_id] * n + wrap[1]``, never trained."""
    out_ids, out_labels = [], []
    for t, label in zip(ids, labels, strict=False):
        if t == image_id:
            piece = list(wrap[0]) + [image_id] * n + list(wrap[1])
            out_ids += piece
            out_labels += [IGNORE] * len(piece)
        else:
            out_ids.append(t)
            out_labels.append(label)
    return out_ids, out_labels


# ----------------------------------------------------------------------------------------- LLaVA-1.5


def _llava_prompt(turns: list[tuple[str, str]]) -> str:
    """``conv_vicuna_v1`` (SeparatorStyle.TWO, sep " ", sep2 "</s>"): system, then ``ROLE: message`` each
    followed by sep (user) or sep2 (assistant); a final empty assistant message adds ``ASSISTANT:``."""
    text = SYSTEM + " "
    for role, message in turns:
        name = "USER" if role == "user" else "ASSISTANT"
        if message is None:
            text += name + ":"
        else:
            text += f"{name}: {message}" + (" " if role == "user" else "</s>")
    return text


def _llava_tokenize(tok, text: str, image_id: int) -> list[int]:
    """``tokenizer_image_token``: each piece between ``<image>`` tokenized on its own with the tokenizer's
    special tokens, BOS kept once at the start, the image index in between."""
    pieces = [tok(piece).input_ids for piece in text.split("<image>")]
    skip = 1 if pieces[0][:1] == [tok.bos_token_id] else 0
    ids = pieces[0][:skip]
    for k, piece in enumerate(pieces):
        if k:
            ids.append(image_id)
        ids += piece[skip:]
    return ids


def llava_v1_reference(tok, turns: list[tuple[str, str]], image_id: int) -> tuple[list[int], list[int]]:
    """LLaVA-1.5's ``preprocess_v1``: ids of the whole prompt, and labels masked round by round.

    Rounds are the prompt split on ``</s>``. A round tokenized alone has BOS in place of the ``</s>`` that
    ends it in the whole prompt, so its length is its span; its instruction is everything up to
    ``" ASSISTANT: "``, whose tokens less two (BOS and the trailing space) are masked."""
    prompt = _llava_prompt(turns)
    ids = _llava_tokenize(tok, prompt, image_id)
    labels = list(ids)
    labels[0] = IGNORE
    position = 1
    sep = " ASSISTANT: "
    for part in prompt.split("</s>"):
        if not part:
            break
        instruction, answer = part.split(sep)
        round_len = len(_llava_tokenize(tok, part, image_id))
        instruction_len = len(_llava_tokenize(tok, instruction + sep, image_id)) - 2
        labels[position: position + instruction_len] = [IGNORE] * instruction_len
        position += round_len
    labels[position:] = [IGNORE] * (len(labels) - position)
    assert position == len(ids), "LLaVA would mask this whole sample (tokenization mismatch)"
    return ids, labels


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A SentencePiece BPE trained like Llama's tokenizer, saved as ``tokenizer.model``."""
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    directory = tmp_path_factory.mktemp("llama_tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()), model_prefix=str(directory / "tokenizer"), model_type="bpe",
        vocab_size=700, hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    SentencePieceBackend(vocab_file=str(directory / "tokenizer.model"), legacy=True).save_pretrained(directory)
    return directory


def _llama_tokenizer(directory, kind: str):
    """The slow SentencePiece tokenizer or the fast ``LlamaTokenizer`` converted from it, legacy, BOS added,
    with ``<image>`` added as a special token."""
    if kind == "slow":
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        tok = SentencePieceBackend(vocab_file=str(directory / "tokenizer.model"), legacy=True, bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", special_tokens_pattern="bos")
    else:
        from transformers import LlamaTokenizer

        tok = LlamaTokenizer.from_pretrained(directory, legacy=True, add_bos_token=True)
        assert tok.backend_tokenizer is not None
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


@pytest.fixture(scope="module", params=["slow", "fast"])
def llama(request, llama_dir):
    tok = _llama_tokenizer(llama_dir, request.param)
    assert tok("USER: hi").input_ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
    return tok


@pytest.mark.parametrize("case", CASES)
def test_vicuna_v1_is_llava_15s_training_sample(llama, case):
    image_id = llama.convert_tokens_to_ids("<image>")
    ids, labels = _expand(*llava_v1_reference(llama, CASES[case], image_id), image_id, N_IMAGE)
    enc = ConversationEncoder(llama, num_image_tokens=N_IMAGE, template="vicuna_v1", image_token_id=image_id)
    out = enc.encode_conversation(Conversation("c", None, CASES[case], "f, record 0"))
    assert llama.convert_ids_to_tokens(out.input_ids) == llama.convert_ids_to_tokens(ids)
    assert out.labels == labels


@pytest.mark.parametrize("question", ["<image>\nWhat colour is the star?", "What colour is the car?\n<image>"])
def test_vicuna_v1_prompt_is_llavas_generation_prompt(llama, question):
    image_id = llama.convert_tokens_to_ids("<image>")
    reference = _llava_tokenize(llama, _llava_prompt([("user", question), ("assistant", None)]), image_id)
    enc = ConversationEncoder(llama, num_image_tokens=1, template="vicuna_v1", image_token_id=image_id)
    assert enc.encode_prompt(question) == reference


# ----------------------------------------------------------------------------------------- Qwen2-VL

QWEN_SYSTEM = "You are a helpful assistant."
#: Qwen2-VL's chat template: a default system message, ``<|im_start|>role\ncontent<|im_end|>\n`` per
#: message, an image part as ``<|vision_start|><|image_pad|><|vision_end|>``.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


@pytest.fixture(scope="module")
def qwen():
    """A byte-level BPE trained here, with Qwen2-VL's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    chats = [f"<|im_start|>user\n{s}<|im_end|>\n<|im_start|>assistant\n{s}<|im_end|>\n" for s in _sentences(1)]
    tok.train_from_iterator(_sentences() + chats, trainers.BpeTrainer(
        vocab_size=800, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    wrapped.chat_template = QWEN2_VL_TEMPLATE
    assert wrapped.bos_token_id is None
    return wrapped


def qwen2_vl_reference(tok, turns: list[tuple[str, str]], n_image: int) -> tuple[list[int], list[int]]:
    """Qwen2-VL's fine-tuning sample: each ``<image>`` becomes ``<|vision_start|>``, ``n_image``
    ``<|image_pad|>`` and ``<|vision_end|>``; the rendered conversation is tokenized whole.

    Labels as the Qwen-VL fine-tuning code (``qwen-vl-finetune``) sets them: each message rendered on its
    own (the default system message first); an assistant message's header ``<|im_start|>assistant\\n``
    masked and the rest trained, that is the answer, ``<|im_end|>`` and the newline after it; every other
    message masked."""
    image = "<|vision_start|>" + "<|image_pad|>" * n_image + "<|vision_end|>"
    ids, labels, text = [], [], ""
    for role, content in [("system", QWEN_SYSTEM)] + list(turns):
        message = f"<|im_start|>{role}\n{content.replace('<image>', image)}<|im_end|>\n"
        text += message
        piece = tok(message, add_special_tokens=False).input_ids
        header = len(tok(f"<|im_start|>{role}\n", add_special_tokens=False).input_ids) if role == "assistant" \
            else len(piece)
        ids += piece
        labels += [IGNORE] * header + piece[header:]
    assert tok(text, add_special_tokens=False).input_ids == ids  # the messages' tokens are the whole text's
    return ids, labels


def _qwen_encoder(tok, n_image: int) -> ConversationEncoder:
    """As ``Qwen2VLMLLM.data_spec()`` configures it: the ``<|image_pad|>`` id, the vision tokens around it."""
    start, end, pad = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    return ConversationEncoder(tok, num_image_tokens=n_image, template="hf", image_token_id=pad,
                               image_wrap=([start], [end]))


@pytest.mark.parametrize("case", CASES)
def test_hf_template_is_qwen2_vls_training_sample(qwen, case):
    ids, labels = qwen2_vl_reference(qwen, CASES[case], N_IMAGE)
    out = _qwen_encoder(qwen, N_IMAGE).encode_conversation(Conversation("c", None, CASES[case], "f, record 0"))
    assert qwen.convert_ids_to_tokens(out.input_ids) == qwen.convert_ids_to_tokens(ids)
    assert out.labels == labels
    trained = [t for t, label in zip(ids, labels, strict=False) if label != IGNORE]
    answers = [text for role, text in CASES[case] if role == "assistant"]
    assert qwen.decode(trained) == "".join(f"{a}<|im_end|>\n" for a in answers)


@pytest.mark.parametrize("question", ["<image>\nWhat colour is the star?", "What colour is the car?\n<image>"])
def test_hf_template_prompt_is_qwen2_vls_generation_prompt(qwen, question):
    ids, _ = qwen2_vl_reference(qwen, [("user", question)], N_IMAGE)
    prompt = ids + qwen("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert _qwen_encoder(qwen, N_IMAGE).encode_prompt(question) == prompt


# ----------------------------------------------------------------------------------------- auto


def test_auto_takes_the_template_each_backbone_gives(tmp_path):
    from mllm_cl.backbones import build_backbone, load_backbone
    from mllm_cl.backbones.hf_tiny import BUILDERS

    templates = {family: load_backbone(BUILDERS[family](tmp_path / family)).model.data_spec()["template"]
                 for family in ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")}
    assert templates == {"llava": "vicuna_v1", "qwen2_vl": "hf", "qwen2_5_vl": "hf", "qwen3_vl": "hf",
                         "internvl": "hf"}
    # The tiny presets and the packaged tiny bases: the tiny configs' template, recorded in mllm_cl.json.
    preset = build_backbone("tiny-clip-llama")
    assert preset.model.data_spec()["template"] == "short"
    assert build_backbone("tiny-base").model.data_spec()["template"] == "short"
    preset.model.save_pretrained(tmp_path / "composed", preset.tokenizer)
    assert load_backbone(tmp_path / "composed").model.template == "short"
    meta = tmp_path / "composed" / "mllm_cl.json"
    meta.write_text(meta.read_text().replace('"template": "short"', '"unused": 0'))
    assert load_backbone(tmp_path / "composed").model.template == "vicuna_v1"  # none recorded: LLaVA-1.5's


@pytest.fixture()
def qwen2_vl_dir(tmp_path):
    """A tiny Qwen2-VL checkpoint whose tokenizer carries Qwen2-VL's chat template."""
    from transformers import AutoTokenizer

    from mllm_cl.backbones.hf_tiny import BUILDERS

    path = BUILDERS["qwen2_vl"](tmp_path / "qwen2_vl")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = QWEN2_VL_TEMPLATE
    tok.save_pretrained(path)
    return path


def _connected(bench, backbone, **options):
    from mllm_cl.data_modules import TaskSequence

    from mllm_cl.data.images import ImageProcessor

    dm = TaskSequence(benchmark=str(bench), batch_size=4, **options)
    spec = backbone.model.data_spec()
    dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), spec.pop("num_image_tokens"), **spec)
    dm.set_task(0)
    return dm, next(iter(dm.train_dataloader()))


def test_a_qwen2_vl_run_with_auto_trains_on_its_chat_template(qwen2_vl_dir, tmp_path, make_bench):
    from mllm_cl.backbones import load_backbone

    backbone = load_backbone(qwen2_vl_dir)
    tok, n = backbone.tokenizer, backbone.model.num_image_tokens
    (tmp_path / "bench").mkdir()
    bench = make_bench(tmp_path / "bench", {"red": (200, 30, 30)}, train=4, test=1)
    dm, batch = _connected(bench, backbone)  # data.template left at auto
    assert dm.template == "auto" and dm._need_model().template == "hf"
    row, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    image = "<|vision_start|>" + tok.convert_ids_to_tokens(backbone.model.image_token_id) * n + "<|vision_end|>"
    assert tok.decode(row).startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{image}\n"
                                      "What colour is it?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")
    assert tok.decode([t for t, label in zip(row, labels, strict=False) if label != IGNORE]) == "red<|im_end|>\n"
    _, batch = _connected(bench, backbone, template="short")  # an explicit data.template wins
    assert tok.decode(batch["input_ids"][0].tolist()).startswith(f"<s>USER: {image}\nWhat colour is it? ASSISTANT: red")


def test_auto_needs_a_template_from_the_backbone_and_the_encoder_a_resolved_one(tmp_path, make_bench):
    from mllm_cl.data_modules import TaskSequence

    from mllm_cl.backbones import build_backbone
    from mllm_cl.data.images import ImageProcessor

    backbone = build_backbone("tiny-clip-llama")
    (tmp_path / "bench").mkdir()
    dm = TaskSequence(benchmark=str(make_bench(tmp_path / "bench", {"red": (200, 30, 30)}, train=2, test=1)))
    with pytest.raises(ValueError, match="data.template is 'auto' but the backbone names no chat template"):
        dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
    with pytest.raises(ValueError, match="template 'auto' is resolved from the backbone"):
        ConversationEncoder(backbone.tokenizer, num_image_tokens=4, template="auto")
    qwen = build_backbone("tiny-clip-llama").tokenizer  # no chat template: 'hf' says what to set
    with pytest.raises(ValueError, match=r"needs a tokenizer with a chat_template .*\(data.template\)"):
        ConversationEncoder(qwen, num_image_tokens=4, template="hf")
