"""Model-specific batch inputs, made by the collator so that users never build them.

A backbone that needs more than ``input_ids``, ``attention_mask`` and
``pixel_values`` of shape (n_images, 3, H, W) hands the data module one of
these (``model.data_spec()["model_inputs"]``); the collator calls it on every
batch. What it returns under ``batch["model_inputs"]`` goes to the model's
forward as keyword arguments; it may also replace ``pixel_values``.

They run in DataLoader workers, so they are small picklable objects of plain
numbers, with no reference to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Qwen2VLInputs:
    """Qwen2-VL / Qwen2.5-VL: flattened vision patches, ``image_grid_thw`` and ``mm_token_type_ids``.

    Each image arrives at a fixed square size (a multiple of ``patch_size * merge_size``)
    and is cut the way Qwen2-VL's image processor cuts it: the frame repeated
    ``temporal_patch_size`` times, patches grouped by ``merge_size`` x ``merge_size``
    blocks, one row of ``3 * temporal_patch_size * patch_size**2`` values per patch.
    """

    image_token_id: int
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C, H, W) -> ((n * gh * gw, C * T * P * P) patches, (n, 3) grid t/h/w)."""
        n, c, h, w = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if h % (p * m) or w % (p * m):
            raise ValueError(f"Qwen2-VL images must be multiples of patch_size x merge_size = {p * m} px, got {h}x{w}")
        gh, gw = h // p, w // p
        frames = pixels.unsqueeze(1).expand(n, t, c, h, w)  # one image = t identical frames
        x = frames.reshape(n, 1, t, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # (n, gt, gh/m, gw/m, m, m, c, t, p, p)
        patches = x.reshape(n * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]], dtype=torch.long).expand(n, 3).clone()
        return patches, grid

    def unpatchify(self, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``patchify``'s inverse for images of one size: patches and (n, 3) grids -> (n, C, H, W)
        (the first of the repeated frames); what a second image encoder (CLIP routing) reads."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        n = grid.shape[0]
        gh, gw = int(grid[0, 1]), int(grid[0, 2])
        if not bool((grid[:, 1:] == grid[:1, 1:]).all()):
            raise ValueError("unpatchify: the batch's images have different grids")
        c = patches.shape[-1] // (t * p * p)
        x = patches.reshape(n, 1, gh // m, gw // m, m, m, c, t, p, p)
        x = x.permute(0, 1, 7, 6, 2, 4, 8, 3, 5, 9)  # (n, gt, t, c, gh/m, m, p, gw/m, m, p)
        return x.reshape(n, t, c, gh * p, gw * p)[:, 0]

    def tokens_per_image(self, image_size: int) -> int:
        return (image_size // self.patch_size) ** 2 // self.merge_size ** 2

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {"mm_token_type_ids": (batch["input_ids"] == self.image_token_id).int()}
        if batch.get("pixel_values") is not None:
            batch["pixel_values"], extra["image_grid_thw"] = self.patchify(batch["pixel_values"])
        batch["model_inputs"] = extra
        return batch
