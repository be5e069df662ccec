"""Map-style datasets over parsed records: image decoding and tokenization per item.

A bad sample found here (a corrupt image, a conversation too long for
``max_length``) raises a ``BadSampleError`` naming file and record, or, with
``on_bad_sample: skip``, becomes a ``Skipped`` that the collator drops and
reports in ``batch["skipped"]`` (worker processes cannot share a counter).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from mllm_cl.data.collate import Skipped
from mllm_cl.data.encoding import ConversationEncoder
from mllm_cl.data.errors import BadSampleError, OnBadSample
from mllm_cl.data.formats import Conversation, TestRecord
from mllm_cl.data.images import ImageProcessor


class _Base(Dataset):
    def __init__(self, items, encoder: ConversationEncoder, images: ImageProcessor, *, task_id: int,
                 on_bad_sample: OnBadSample = "raise") -> None:
        self.items = list(items)
        self.encoder, self.images = encoder, images
        self.task_id, self.on_bad_sample = task_id, on_bad_sample

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        item = self.items[index]
        try:
            return {**self._item(item), "index": index}
        except BadSampleError as e:
            if self.on_bad_sample == "raise":
                raise
            return Skipped(str(e))

    def _pixels(self, item):
        return None if item.image is None else self.images.load(item.image, item.source)


def conversation_item(conv: Conversation, encoder: ConversationEncoder, images: ImageProcessor,
                      task_id: int) -> dict[str, Any]:
    """One training sample (shared with the shard stream, so both give identical samples)."""
    enc = encoder.encode_conversation(conv)
    pixels = None if conv.image is None else images.load(conv.image, conv.source)
    return {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": pixels,
            "instruction": conv.instruction.replace("<image>", "").strip(), "task_id": task_id, "id": conv.id}


class ConversationDataset(_Base):
    """Training samples: input ids, labels on answers only, pixels, the instruction text."""

    def _item(self, conv: Conversation) -> dict[str, Any]:
        return conversation_item(conv, self.encoder, self.images, self.task_id)


class PromptDataset(_Base):
    """Evaluation samples: the prompt only (generation prompt appended) and the test row."""

    def _item(self, rec: TestRecord) -> dict[str, Any]:
        return {"input_ids": self.encoder.encode_prompt(rec.prompt, rec.source), "pixel_values": self._pixels(rec),
                "instruction": rec.prompt.replace("<image>", "").strip(), "task_id": self.task_id,
                "id": rec.question_id, "record": rec.as_record()}
