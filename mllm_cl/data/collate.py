"""Batches: padding-aware collation of encoded samples.

Training batches pad on the right; generation batches on the left, so every
prompt ends at the last position and decoding appends after it. A batch also
carries what methods need beyond the LM inputs: the instruction-only text,
the image-token mask (positions of image features), the supervised positions
of a training batch (``loss_positions``), task ids, and the
messages of samples skipped as bad input in this batch. A backbone that needs
inputs of its own (Qwen2-VL's patches and grids) gets them added here, under
``batch["model_inputs"]``, by the object its ``data_spec()`` names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mllm_cl.data.encoding import IGNORE


@dataclass
class Skipped:
    """What a dataset returns for a bad sample under ``on_bad_sample: skip``."""

    message: str


class Collator:
    def __init__(self, *, pad_token_id: int, image_token_id: int, padding_side: str = "right",
                 model_inputs: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.padding_side = padding_side
        self.model_inputs = model_inputs  # a backbone's own inputs (mllm_cl.data.model_inputs)

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if self.padding_side == "left":
                out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            else:
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def __call__(self, samples: list[dict[str, Any] | Skipped]) -> dict[str, Any]:
        kept = [s for s in samples if not isinstance(s, Skipped)]
        batch: dict[str, Any] = {"skipped": [s.message for s in samples if isinstance(s, Skipped)]}
        if not kept:
            batch["empty"] = True
            return batch
        ids = [s["input_ids"] for s in kept]
        batch["input_ids"] = self._pad(ids, self.pad_token_id)
        batch["attention_mask"] = self._pad([[1] * len(r) for r in ids], 0)
        if "labels" in kept[0]:
            batch["labels"] = self._pad([s["labels"] for s in kept], IGNORE)
            # here, on the host: on the device, finding them would wait for it (a data-dependent size)
            batch["loss_positions"] = supervised_positions(batch["labels"])
        batch["image_mask"] = batch["input_ids"] == self.image_token_id  # (B, L)
        images = [s["pixel_values"] for s in kept if s["pixel_values"] is not None]
        batch["pixel_values"] = torch.stack(images) if images else None  # in sample order
        batch["has_image"] = torch.tensor([s["pixel_values"] is not None for s in kept])
        batch["task_ids"] = torch.tensor([s["task_id"] for s in kept], dtype=torch.long)
        batch["instruction"] = [s["instruction"] for s in kept]
        batch["ids"] = [s["id"] for s in kept]
        batch["index"] = [s["index"] for s in kept]  # position in the dataset (evaluation gathers by it)
        if "record" in kept[0]:
            batch["records"] = [s["record"] for s in kept]
        return batch if self.model_inputs is None else self.model_inputs(batch)


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, L): the label each position predicts (the labels shifted left, ``IGNORE`` at the end)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(N,) flat indices into ``(B * L)`` of the positions whose next label is supervised (a causal
    LM's loss needs the logits there only)."""
    return (next_labels(labels) != IGNORE).reshape(-1).nonzero().flatten()


def batch_to(batch: dict[str, Any], device) -> dict[str, Any]:
    """The batch with its tensors (and those of ``model_inputs``) on ``device``."""
    return {k: batch_to(v, device) if isinstance(v, dict) else v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
