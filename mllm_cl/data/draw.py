"""Drawing the synthetic scenes: shapes, colours, rendered words (PIL only, offline).

Objects are described by ``Obj`` (shape, colour, centre, radius) so that a
task can state its answer from the description alone (the box of an object,
which is largest, what is left of what) and tests can re-derive it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 30),
}
BACKGROUND = (245, 245, 245)
GRID_ROWS = ("top", "middle", "bottom")
GRID_COLS = ("left", "center", "right")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float
    cy: float
    r: float  # half the side of the object's bounding box

    def box(self) -> tuple[float, float, float, float]:
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


def _polygon(o: Obj) -> list[tuple[float, float]]:
    cx, cy, r = o.cx, o.cy, o.r
    if o.shape == "square":
        k = r * 0.9
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if o.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if o.shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if o.shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if o.shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {o.shape!r}")


def render(objects: list[Obj], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(o.box(), fill=fill)
        else:
            draw.polygon(_polygon(o), fill=fill)
    return image


INKS = ((20, 20, 20), (30, 30, 110), (110, 25, 25), (25, 85, 25))


def render_word(word: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Dark text (one of ``INKS``) on the background, scaled up by the largest whole
    factor (nearest neighbour, never blurred) that fits the width with a pixel to spare."""
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(word)
    ink = INKS[int(rng.integers(len(INKS)))]
    text = Image.new("RGB", (right - left + 2, bottom - top + 2), BACKGROUND)
    ImageDraw.Draw(text).text((1 - left, 1 - top), word, fill=ink, font=font)
    scale = max(1, (size - 2) // text.width)
    text = text.resize((text.width * scale, text.height * scale), Image.Resampling.NEAREST)
    image = Image.new("RGB", (size, size), BACKGROUND)
    x = int(rng.integers(0, max(1, size - text.width + 1)))
    y = int(rng.integers(0, max(1, size - text.height + 1)))
    image.paste(text, (x, y))
    return image


def place(rng: np.random.Generator, size: int, specs: list[tuple[str, str, float]], *, tries: int = 200,
          restarts: int = 50) -> list[Obj]:
    """Objects (shape, colour, radius) at random non-overlapping positions inside a margin.

    Greedy placement can corner itself (a first object in the middle), so it
    starts over a bounded number of times before giving up.
    """
    margin = 1.0
    for _ in range(restarts):
        placed: list[Obj] = []
        for shape, colour, r in specs:
            for _ in range(tries):
                cx = float(rng.uniform(r + margin, size - r - margin))
                cy = float(rng.uniform(r + margin, size - r - margin))
                if all(max(abs(cx - o.cx), abs(cy - o.cy)) > r + o.r + 1 for o in placed):
                    placed.append(Obj(shape, colour, round(cx, 1), round(cy, 1), r))
                    break
            else:
                break
        if len(placed) == len(specs):
            return placed
    raise ValueError(f"could not place {len(specs)} objects of radius up to {max(s[2] for s in specs)} "
                     f"without overlap on a {size}px image; use a larger --image-size")


def where(o: Obj, size: int) -> str:
    """The object's cell of a 3x3 grid, as captions say it ("the top left", "the center")."""
    row = GRID_ROWS[min(2, int(o.cy * 3 // size))]
    col = GRID_COLS[min(2, int(o.cx * 3 // size))]
    return "the center" if (row, col) == ("middle", "center") else f"the {row} {col}"


def box_text(o: Obj, size: int) -> str:
    """The object's box as grounding answers write it: ``[x1, y1, x2, y2]`` normalized, two decimals."""
    return "[" + ", ".join(f"{v / size:.2f}" for v in o.box()) + "]"


def and_list(parts: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``: how captions list things."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_caption(objs: list[Obj], size: int) -> str:
    """A shape scene's caption: every object with its place, top to bottom, left to right."""
    ordered = sorted(objs, key=lambda o: (o.cy, o.cx))
    return and_list([f"a {o.colour} {o.shape} at {where(o, size)}" for o in ordered]) + "."
