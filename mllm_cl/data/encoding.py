"""Conversation -> token ids and labels; prompt -> token ids.

- ``<image>`` becomes ``num_image_tokens`` copies of the image token id, the
  count the vision tower produces, so the model can place image features.
- labels are -100 everywhere but assistant answers (and their EOS).
- truncation cuts the tail and never an image token: a sample whose image
  tokens do not fit, or whose first answer token is cut, is a bad sample.

``vicuna_v1`` / ``short`` give LLaVA-1.5's training sample: the whole prompt
(``{system} USER: q ASSISTANT: a</s>USER: ...``) is tokenized as one text per
piece between images, as LLaVA's ``tokenizer_image_token`` does, so a
SentencePiece tokenizer's dummy prefix (``▁``) appears where LLaVA's does and
nowhere else; each answer's tokens (``▁a``, ``</s>``) are found from the
tokens' character offsets (a fast tokenizer) or by tokenizing the text before
and through it (a slow one).

``hf`` renders the tokenizer's ``chat_template`` and trains what each assistant
message adds after the generation prompt: with Qwen2-VL's template
``a<|im_end|>\n``, the answer, ``<|im_end|>`` and the newline after it, as
the Qwen-VL fine-tuning code (``qwen-vl-finetune``) does.
"""

from __future__ import annotations

from bisect import bisect_left
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
        if template == "auto":
            raise ValueError("template 'auto' is resolved from the backbone (TaskSequence.connect); "
                             "ConversationEncoder needs the resolved name: vicuna_v1, short or hf")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_token_id = (image_token_id if image_token_id is not None
                               else getattr(tokenizer, "image_token_id", None))
        if self.image_token_id is None:
            raise ValueError("the tokenizer has no image token: pass image_token_id")
        self.image_open, self.image_close = list(image_wrap[0]), list(image_wrap[1])
        self._image_ids = self.image_open + [self.image_token_id] * num_image_tokens + self.image_close
        self._image_labels = [IGNORE] * len(self._image_ids)
        if self.template == "hf" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'hf' needs a tokenizer with a chat_template and this tokenizer has none; "
                             "choose 'vicuna_v1' or 'short' (data.template)")
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # A fast tokenizer's Rust backend gives the same ids as ``tokenizer(text, add_special_tokens=False)``
        # at a quarter of the cost per call (the Python wrapper dominates for short texts), and the
        # tokens' character offsets.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    # ------------------------------------------------------------- pieces
    def _part(self, part: str, cuts: list[int], source: str) -> tuple[list[int], list[int]]:
        """``part`` tokenized whole (special tokens in it read as such, no BOS added) and, for each
        position in ``cuts``, how many of its tokens come before it: from the tokens' character offsets
        (a fast tokenizer), else from the tokens of the text up to the position, which must begin the
        whole text's. A token that spans a position is an error."""
        if self._backend is not None:
            enc = self._backend.encode(part, add_special_tokens=False)
            offsets = enc.offsets  # (start, end) characters, in text order
            starts = [start for start, _ in offsets]
            counts = [bisect_left(starts, cut) for cut in cuts]
            if any(n and offsets[n - 1][1] > cut for n, cut in zip(counts, cuts, strict=False)):
                raise self._merged(source)
            return enc.ids, counts
        ids = self.tokenizer(part, add_special_tokens=False).input_ids
        counts = []
        for cut in cuts:
            head = ids if cut == len(part) else self.tokenizer(part[:cut], add_special_tokens=False).input_ids
            if head != ids[: len(head)]:
                raise self._merged(source)
            counts.append(len(head))
        return ids, counts

    @staticmethod
    def _merged(source: str) -> BadSampleError:
        return BadSampleError(source, "the tokenizer merges an answer's first or last characters with the text "
                                      "next to them: its tokens cannot be told apart")

    def _tokenize(self, text: str, cuts: list[int], source: str) -> tuple[list[int], dict[int, int]]:
        """Tokens of ``text``, the pieces between images tokenized on their own and each ``<image>``
        expanded to the image placeholders; and for each character position in ``cuts``, the number of
        tokens before it."""
        ids: list[int] = []
        counts: dict[int, int] = {}
        start = 0
        for k, part in enumerate(text.split(IMAGE)):
            if k:
                ids += self._image_ids
                start += len(IMAGE)
            end = start + len(part)
            inside = [cut for cut in cuts if start <= cut <= end and cut not in counts]
            part_ids, before = ([], [0] * len(inside)) if not part else \
                self._part(part, [cut - start for cut in inside], source)
            counts.update({cut: len(ids) + n for cut, n in zip(inside, before, strict=False)})
            ids += part_ids
            start = end
        return ids, counts

    def _segments_ids(self, segments: list[Segment], source: str) -> Encoded:
        """The segments joined into one text (EOS as the tokenizer's EOS token text), tokenized whole;
        labels are the tokens of the trainable segments."""
        eos = self.tokenizer.eos_token
        text, spans = "", []
        for seg in segments:
            begin = len(text)
            text += seg.text + (eos if seg.eos else "")
            if seg.trainable:
                spans.append((begin, len(text), seg.eos))
        ids, counts = self._tokenize(text, sorted({c for a, b, _ in spans for c in (a, b)}), source)
        labels = [IGNORE] * len(ids)
        for a, b, ends_with_eos in spans:
            first, last = counts[a], counts[b]
            if ends_with_eos and (last <= first or ids[last - 1] != self.tokenizer.eos_token_id):
                raise ValueError(f"the tokenizer does not read its EOS token text {eos!r} as the EOS token")
            labels[first:last] = ids[first:last]
        labels = [IGNORE if t == self.image_token_id else label for t, label in zip(ids, labels, strict=False)]
        return Encoded(self.bos + ids, [IGNORE] * len(self.bos) + labels)

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
        for t, label in zip(ids, labels, strict=False):
            if t == self.image_token_id:
                out_ids += self._image_ids
                out_labels += self._image_labels
            else:
                out_ids.append(t)
                out_labels.append(label)
        return Encoded(out_ids, out_labels)

    def _apply(self, messages, add_generation_prompt: bool = False) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def _encode(self, turns, add_generation_prompt: bool, source: str = "") -> Encoded:
        if self.template == "hf":
            return self._hf_ids(turns, add_generation_prompt)
        return self._segments_ids(self.template.segments(turns, add_generation_prompt=add_generation_prompt), source)

    # ------------------------------------------------------------- public
    def encode_conversation(self, conv: Conversation) -> Encoded:
        enc = self._encode(conv.turns, add_generation_prompt=False, source=conv.source)
        if len(enc.input_ids) > self.max_length:
            cut = enc.input_ids[self.max_length:]
            if self.image_token_id in cut:
                raise BadSampleError(conv.source, f"too long: image tokens end after max_length {self.max_length}")
            enc = Encoded(enc.input_ids[: self.max_length], enc.labels[: self.max_length])
            if all(label == IGNORE for label in enc.labels):
                raise BadSampleError(conv.source,
                                     f"too long: the first answer starts after max_length {self.max_length}")
        return enc

    def encode_prompt(self, prompt: str, source: str = "") -> list[int]:
        """One user turn and the generation prompt (``... ASSISTANT:``)."""
        ids = self._encode([("user", prompt)], add_generation_prompt=True, source=source).input_ids
        if len(ids) > self.max_length:
            raise BadSampleError(source, f"too long: the prompt has {len(ids)} tokens, max_length is {self.max_length}")
        return ids
