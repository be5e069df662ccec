"""Image loading and preprocessing for the vision tower (LLaVA-1.5's 'pad' recipe).

The image is padded to a square with the normalization mean colour (so the
padding is zero after normalization), resized to the tower's input size and
normalized. A file that cannot be decoded is a ``BadSampleError`` naming it.
Images read from a shard arrive as ``ImageBytes`` (the encoded file in
memory) and are decoded the same way, so a shard and the folder it was
written from give identical pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image, UnidentifiedImageError

from mllm_cl.data.errors import BadSampleError


class ImageBytes(NamedTuple):
    """An encoded image file held in memory (a shard member): its bytes and its name for messages."""

    data: bytes
    name: str

    def __str__(self) -> str:
        return self.name


class ImageProcessor:
    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                 pad_to_square: bool = True) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.pad_to_square = pad_to_square
        self._fill = tuple(int(round(m * 255)) for m in mean)

    @classmethod
    def for_model(cls, model) -> ImageProcessor:
        """Size and normalization a backbone's vision tower expects (``image_size``, ``image_mean``, ``image_std``)."""
        return cls(model.image_size, model.image_mean, model.image_std)

    def open(self, path: str | Path | ImageBytes, where: str = "") -> Image.Image:
        """Decode an image file (or ``ImageBytes``) to RGB; a ``BadSampleError`` names it if it cannot be."""
        source = io.BytesIO(path.data) if isinstance(path, ImageBytes) else path
        try:
            with Image.open(source) as im:
                im.load()  # decode now, so a truncated file fails here and not in a worker later
                return im.convert("RGB")
        except FileNotFoundError:
            raise BadSampleError(where or str(path), f"missing image: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise BadSampleError(where or str(path), f"corrupt image: {path} ({e})") from None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, size, size) normalized float tensor."""
        if self.pad_to_square and image.width != image.height:
            side = max(image.width, image.height)
            canvas = Image.new("RGB", (side, side), self._fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255  # (3, H, W)
        return (pixels - self.mean) / self.std

    def load(self, path: str | Path | ImageBytes, where: str = "") -> torch.Tensor:
        return self(self.open(path, where))
