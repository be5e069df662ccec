"""Bounding boxes in text: the parsers the benchmark scripts use, a fixed one, and IoU.

Boxes are ``[x1, y1, x2, y2]`` with coordinates normalized to the image
padded to a square (CoIN's convention for RefCOCO/+/g), so the scripts scale
both boxes by ``max(w, h)`` before computing IoU. IoU does not change under a
common scale, but the scaled floating-point values can land on the other side
of the 0.5 threshold, so the official modes scale exactly as the scripts do.

Parsers (each returns ``None`` for text it cannot read):

- ``parse_box_coin`` -- zackschen/CoIN ``llava/eval/CoIN/eval_grounding.py``
  (commit 2412675; Ghy0501/MCITlib's copy is the same): delete every ``[``
  and ``]``, then drop the first and the last character of what is left,
  split on commas and read each piece with Python's ``float``; four numbers
  or nothing. Because the brackets are gone before the trimming, the trim
  eats real characters: ``"[0.12, 0.34, 0.56, 0.78]"`` reads as
  ``[0.12, 0.34, 0.56, 0.7]``, ``"[0, 0, 1, 1]"`` does not parse at all, a
  leading space is what the trim removes, and any words around the box make
  it unparseable.
- ``parse_box_first_four`` -- Zhen-Hao-Xie/Prism
  ``backbone/shared/eval/eval_unified.py`` (default, non-legacy parse): the
  first four numbers anywhere in the text, whatever separates them
  (``"box 2: 0.1 0.2 0.3 0.4"`` reads as ``[2, 0.1, 0.2, 0.3]``).
- ``parse_box_clean`` -- the first bracketed or parenthesized group of exactly
  four comma-separated numbers, or a text that is only four comma-separated
  numbers; finite values with ``x2 > x1`` and ``y2 > y1`` only.
- ``parse_box`` -- the generic rule's parser: the first ``[a, b, c, d]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

Box = tuple[float, float, float, float]

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_GROUPED = re.compile(rf"[\[(]\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*[\])]")
_BARE = re.compile(rf"\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*")
_PRISM_NUMBER = re.compile(r"-?\d*\.?\d+(?:[eE][-+]?\d+)?")
_DECIMAL = r"(-?\d+(?:\.\d+)?)"
_GENERIC = re.compile(rf"\[\s*{_DECIMAL}\s*,\s*{_DECIMAL}\s*,\s*{_DECIMAL}\s*,\s*{_DECIMAL}\s*\]")


def _floats(pieces: Sequence[str]) -> list[float] | None:
    try:
        return [float(p) for p in pieces]
    except ValueError:
        return None


def parse_box_coin(text: str) -> Box | None:
    """A predicted box as CoIN's grounding script (and MCITlib's copy) reads it."""
    values = _floats(text.replace("[", "").replace("]", "")[1:-1].split(","))
    return tuple(values) if values is not None and len(values) == 4 else None  # type: ignore[return-value]


def parse_answer_box_coin(text: str) -> Box | None:
    """A ground-truth ``answer_bbox`` as the CoIN/MCITlib scripts read it: brackets deleted, comma-split, no trim."""
    values = _floats(text.replace("[", "").replace("]", "").split(","))
    return tuple(values) if values is not None and len(values) == 4 else None  # type: ignore[return-value]


def parse_box_first_four(text: str) -> Box | None:
    """The first four numbers anywhere in ``text`` (Prism's parser), or None when there are fewer."""
    found = _PRISM_NUMBER.findall(str(text))
    if len(found) < 4:
        return None
    values = _floats(found[:4])
    return tuple(values) if values is not None else None  # type: ignore[return-value]


def parse_box_clean(text: str) -> Box | None:
    """The first ``[x1, y1, x2, y2]`` (or ``(...)``, or bare ``x1, y1, x2, y2``) that is a real box."""
    m = _GROUPED.search(text) or _BARE.fullmatch(text)
    if m is None:
        return None
    box = tuple(float(v) for v in m.groups())
    if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box  # type: ignore[return-value]


def parse_box(text: str) -> Box | None:
    """The first ``[x1, y1, x2, y2]`` in ``text`` (the generic ``grounding_iou`` rule's parser), or None."""
    m = _GENERIC.search(text)
    return None if m is None else tuple(float(v) for v in m.groups())  # type: ignore[return-value]


def iou_as_scripts(pred: Sequence[float], truth: Sequence[float]) -> float:
    """IoU exactly as the CoIN/MCITlib/Prism scripts compute it (prediction first).

    No check that a box is well formed: an inverted box has a negative or
    flipped area, and the union can come out positive with a meaningless IoU.
    The argument order of ``min``/``max`` is kept, which decides the result
    when a coordinate is NaN.
    """
    x1, y1, x2, y2 = pred
    x21, y21, x22, y22 = truth
    inter = max(0, min(x2, x22) - max(x1, x21)) * max(0, min(y2, y22) - max(y1, y21))
    union = (x2 - x1) * (y2 - y1) + (x22 - x21) * (y22 - y21) - inter
    return inter / union if union > 0 else 0


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes; a box without positive area overlaps nothing."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def scale(box: Sequence[float], factor: float) -> list[float]:
    """Every coordinate times ``factor`` (normalized square-padded coordinates to pixels)."""
    return [v * factor for v in box]
