"""Conversation -> token ids and labels; prompt -> token ids.

- ``<image>`` becomes ``num_image_tokens`` copies of the image token id, the
  count the vision tower produces, so the model can place image features.
- labels are -100 everywhere but assistant answers (and their EOS).
- truncation cuts the tail and never an image token: a sample whose image
  tokens do not fit, or whose first answer token is cut, is a bad sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_cl.data.errors import BadSampleError
from mllm_cl.data.formats import Conversation
from mllm_cl.data.template import Segment, get_template

IGNORE = -100
IMAGE = "<image>"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class ConversationEncoder:
    """Tokenizes conversations with a chat template.

    Args:
        tokenizer: a transformers tokenizer with an image token (``tokenizer.image_token``
            or ``image_token_id``).
        num_image_tokens: placeholders per image (the model's ``num_image_tokens``).
        template: ``vicuna_v1``, ``short`` or ``hf`` (the tokenizer's ``chat_template``).
        max_length: longest sequence kept (prompt + answer).
        image_token_id: the placeholder id (default: the tokenizer's ``image_token_id``).
        image_wrap: token ids put before and after each image's placeholders
            (Qwen2-VL's ``<|vision_start|>`` / ``<|vision_end|>``); never trained on.
    """

    def __init__(self, tokenizer, *, num_image_tokens: int, template: str = "vicuna_v1", max_length: int = 2048,
                 image_token_id: int | None = None, image_wrap: tuple[list[int], list[int]] = ([], [])) -> None:
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_token_id = image_token_id if image_token_id is not None else getattr(tokenizer, "image_token_id", None)
        if self.image_token_id is None:
            raise ValueError("the tokenizer has no image token: pass image_token_id")
        self.image_open, self.image_close = list(image_wrap[0]), list(image_wrap[1])
        self._image_ids = self.image_open + [self.image_token_id] * num_image_tokens + self.image_close
        self._image_labels = [IGNORE] * len(self._image_ids)
        if self.template == "hf" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'hf' needs a tokenizer with a chat_template; use 'vicuna_v1' or 'short'")
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # A fast tokenizer's Rust backend gives the same ids as ``tokenizer(text, add_special_tokens=False)``
        # at a quarter of the cost per call (the Python wrapper dominates for short segments).
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    # ------------------------------------------------------------- pieces
    def _text_ids(self, text: str) -> list[int]:
        """Tokens of ``text`` with each ``<image>`` expanded to the image placeholders."""
        ids: list[int] = []
        for k, part in enumerate(text.split(IMAGE)):
            if k:
                ids += self._image_ids
            if part and self._backend is not None:
                ids += self._backend.encode(part, add_special_tokens=False).ids
            elif part:
                ids += self.tokenizer(part, add_special_tokens=False).input_ids
        return ids

    def _segments_ids(self, segments: list[Segment]) -> Encoded:
        ids, labels = list(self.bos), [IGNORE] * len(self.bos)
        for seg in segments:
            piece = self._text_ids(seg.text) + ([self.tokenizer.eos_token_id] if seg.eos else [])
            ids += piece
            labels += piece if seg.trainable else [IGNORE] * len(piece)
        return Encoded(ids, labels)

    def _hf_ids(self, turns: list[tuple[str, str]], add_generation_prompt: bool) -> Encoded:
        """The tokenizer's chat template; answers found as the difference between prefixes."""
        image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        messages = [{"role": r, "content": t.replace(IMAGE, image_token)} for r, t in turns]
        ids: list[int] = []
        labels: list[int] = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prefix = self._apply(messages[:i], add_generation_prompt=True)
                full = self._apply(messages[: i + 1])
                if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
                    raise ValueError("the tokenizer's chat template is not prefix-stable; use 'vicuna_v1' or 'short'")
                labels += [IGNORE] * (len(prefix) - len(ids)) + full[len(prefix):]
                ids = full
        if add_generation_prompt:
            prompt = self._apply(messages, add_generation_prompt=True)
            labels += [IGNORE] * (len(prompt) - len(ids))
            ids = prompt
        # Expand each single image token to the model's placeholders (and wrap tokens).
        out_ids, out_labels = [], []
        for t, l in zip(ids, labels):
            if t == self.image_token_id:
                out_ids += self._image_ids
                out_labels += self._image_labels
            else:
                out_ids.append(t)
                out_labels.append(l)
        return Encoded(out_ids, out_labels)

    def _apply(self, messages, add_generation_prompt: bool = False) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def _encode(self, turns, add_generation_prompt: bool) -> Encoded:
        if self.template == "hf":
            return self._hf_ids(turns, add_generation_prompt)
        return self._segments_ids(self.template.segments(turns, add_generation_prompt=add_generation_prompt))

    # ------------------------------------------------------------- public
    def encode_conversation(self, conv: Conversation) -> Encoded:
        enc = self._encode(conv.turns, add_generation_prompt=False)
        if len(enc.input_ids) > self.max_length:
            cut = enc.input_ids[self.max_length:]
            if self.image_token_id in cut:
                raise BadSampleError(conv.source, f"too long: image tokens end after max_length {self.max_length}")
            enc = Encoded(enc.input_ids[: self.max_length], enc.labels[: self.max_length])
            if all(l == IGNORE for l in enc.labels):
                raise BadSampleError(conv.source, f"too long: the first answer starts after max_length {self.max_length}")
        return enc

    def encode_prompt(self, prompt: str, source: str = "") -> list[int]:
        """One user turn and the generation prompt (``... ASSISTANT:``)."""
        ids = self._encode([("user", prompt)], add_generation_prompt=True).input_ids
        if len(ids) > self.max_length:
            raise BadSampleError(source, f"too long: the prompt has {len(ids)} tokens, max_length is {self.max_length}")
        return ids
