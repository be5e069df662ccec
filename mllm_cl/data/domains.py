"""Drawing the CoIN-shaped suite's visual domains (PIL only; fonts from matplotlib's bundle).

Each domain has its own look, so that the base's image features tell them
apart as ScienceQA's diagrams, TextVQA's street photos, ImageNet's photos and
OCR-VQA's book covers differ: bar charts on white with axes, street signs under
a sky, handwritten digits on a ruled notepad (real images, ``real_images``), dark blurred
photos of an object on a table, and book covers with a serif title. The shape
scenes of ``draw`` are the domain three tasks share (as GQA, VQAv2 and RefCOCO
share COCO's images).

Every function is a pure function of its random generator, and returns the
image and the facts its answers are derived from.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mllm_cl.data.draw import COLOURS, INKS, Obj, place, render

#: The fonts' source, for the benchmark manifest.
FONT_SOURCE = {
    "domain": "signs, covers",
    "source": "DejaVu Sans Bold and DejaVu Serif Bold, the TrueType fonts bundled with matplotlib (mpl-data/fonts/ttf)",
    "licence": "Bitstream Vera / DejaVu font licence (free to use and redistribute)",
}

SIGN_COLOURS = {"green": (20, 110, 60), "blue": (25, 60, 160), "red": (170, 25, 25), "brown": (115, 65, 25)}
COVER_COLOURS = {"navy": (25, 35, 90), "maroon": (110, 20, 35), "teal": (15, 100, 100), "black": (20, 20, 20),
                 "olive": (95, 95, 20), "plum": (80, 35, 90)}
CHART_BACKGROUND = (255, 255, 255)
AXIS = (60, 60, 60)


@cache
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib  # heavy: only for a task that draws text

    path = Path(matplotlib.get_data_path(), "fonts", "ttf", name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: matplotlib's bundled font is missing (reinstall matplotlib)")
    return ImageFont.truetype(str(path), size)


def _text_image(text: str, face: ImageFont.FreeTypeFont, ink, paper) -> Image.Image:
    left, top, right, bottom = face.getbbox(text)
    image = Image.new("RGB", (right - left + 2, bottom - top + 2), paper)
    ImageDraw.Draw(image).text((1 - left, 1 - top), text, fill=ink, font=face)
    return image


def bar_chart(rng: np.random.Generator, size: int, colours: list[str]) -> tuple[Image.Image, list[float]]:
    """Bars of the given colours, left to right, on white axes; one bar (``heights``'s
    argmax) is at least 1.4 times as tall as any other. Returns the image and the heights
    as fractions of the plot's height."""
    n = len(colours)
    tallest = int(rng.integers(n))
    heights = [float(rng.uniform(0.2, 0.55)) for _ in range(n)]
    heights[tallest] = float(rng.uniform(0.8, 0.95))
    image = Image.new("RGB", (size, size), CHART_BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, bottom, top = 4, size - 4, 3
    draw.line([(left, top), (left, bottom), (size - 2, bottom)], fill=AXIS, width=1)
    slot = (size - 2 - left - 1) / n
    width = max(3.0, slot * 0.7)
    for i, (colour, h) in enumerate(zip(colours, heights, strict=False)):
        x0 = left + 1 + i * slot + (slot - width) / 2
        draw.rectangle([x0, bottom - 1 - h * (bottom - 1 - top), x0 + width - 1, bottom - 1], fill=COLOURS[colour])
    return image, [round(h, 3) for h in heights]


def street_sign(rng: np.random.Generator, size: int, word: str) -> tuple[Image.Image, str]:
    """A coloured sign on a pole under a sky, ``word`` in white bold letters; returns the
    image and the sign's colour name."""
    sky = np.array([150, 190, 235]) + rng.integers(-15, 16, 3)
    ground = np.array([120, 120, 115]) + rng.integers(-10, 11, 3)
    horizon = int(size * rng.uniform(0.6, 0.75))
    pixels = np.zeros((size, size, 3), np.float32)
    shade = np.linspace(1.0, 0.85, horizon)[:, None]
    pixels[:horizon] = sky[None, None, :] * shade[:, :, None]
    pixels[horizon:] = ground
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    colour = list(SIGN_COLOURS)[int(rng.integers(len(SIGN_COLOURS)))]
    text = _text_image(word, font("DejaVuSans-Bold.ttf", max(8, size * 12 // 48)), (250, 250, 250),
                       SIGN_COLOURS[colour])
    pad = 3
    w, h = text.width + 2 * pad, text.height + 2 * pad
    x = int(rng.integers(1, max(2, size - w)))
    y = int(rng.integers(1, max(2, horizon - h - 2)))
    draw = ImageDraw.Draw(image)
    pole_x = x + w // 2
    draw.rectangle([pole_x - 1, y + h, pole_x, size - 1], fill=(70, 70, 70))
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=SIGN_COLOURS[colour])
    image.paste(text, (x + pad, y + pad))
    return image, colour


def handwritten_digit(rng: np.random.Generator, size: int, digit: np.ndarray) -> Image.Image:
    """An 8x8 digit (ink in [0, 1]) scaled up smoothly, in a dark ink on a ruled notepad page
    (pale yellow, blue rules, a red margin line)."""
    paper = np.array([250, 244, 205], np.float32) + rng.integers(-8, 9, 3)
    page = np.broadcast_to(paper, (size, size, 3)).copy()
    gap = max(4, size * 7 // 48)
    for y in range(int(rng.integers(gap)), size, gap):
        page[y] = (140, 175, 230)
    margin = int(rng.integers(size // 12, size // 6))
    page[:, margin] = (225, 110, 110)
    ink = np.array(INKS[int(rng.integers(len(INKS)))], np.float32)
    side = int(rng.integers(size * 26 // 48, size * 40 // 48 + 1))
    glyph = Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    alpha = np.zeros((size, size), np.float32)
    x, y = (int(rng.integers(0, size - side + 1)) for _ in range(2))
    alpha[y:y + side, x:x + side] = np.asarray(glyph, np.float32) / 255.0
    pixels = page * (1 - alpha[..., None]) + ink[None, None, :] * alpha[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def degraded_photo(rng: np.random.Generator, size: int, obj: tuple[str, str] | None, *, hopeless: bool) -> Image.Image:
    """A dark, noisy, blurred, tilted photo of one object (shape, colour) on a wooden table,
    as a blind user might take it (VizWiz). ``obj`` None: the table alone; ``hopeless``:
    so blurred and dark that nothing can be told."""
    table = np.array([150, 110, 70], np.float32) + rng.integers(-20, 21, 3)
    grain = rng.normal(0, 1, (size, 1)).repeat(size, 1).T * 10  # vertical wood grain
    pixels = table[None, None, :] + grain[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if obj is not None:
        shape, colour = obj
        r = round(float(rng.uniform(0.2, 0.3)) * size, 1)
        o = place(rng, size, [(shape, colour, r)])[0]
        layer = render([o], size)
        mask = Image.fromarray(((np.asarray(layer) != np.asarray(render([], size))).any(-1) * 255).astype(np.uint8))
        image.paste(layer, (0, 0), mask)
    image = image.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BILINEAR,
                         fillcolor=tuple(int(v) for v in table * 0.6))
    blur = float(rng.uniform(5.0, 7.0)) if hopeless else float(rng.uniform(0.5, 1.5))
    image = image.filter(ImageFilter.GaussianBlur(blur))
    light = float(rng.uniform(0.12, 0.2)) if hopeless else float(rng.uniform(0.45, 0.8))
    pixels = np.asarray(image, np.float32) * light + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def book_cover(rng: np.random.Generator, size: int, title: str) -> tuple[Image.Image, str]:
    """A book cover: a coloured board, a pale band with the title in a serif face in the
    board's colour, an author line; returns the image and the board's colour name."""
    colour = list(COVER_COLOURS)[int(rng.integers(len(COVER_COLOURS)))]
    board = tuple(COVER_COLOURS[colour])
    image = Image.new("RGB", (size, size), board)
    draw = ImageDraw.Draw(image)
    band = tuple(int(v) for v in np.array([238, 230, 205]) + rng.integers(-10, 11, 3))
    band_top = int(rng.integers(size // 8, size // 3))
    band_h = size * 18 // 48
    draw.rectangle([0, band_top, size - 1, band_top + band_h], fill=band)
    draw.rectangle([0, 0, 2, size - 1], fill=tuple(v // 2 for v in board))  # the spine's edge
    text = _text_image(title, font("DejaVuSerif-Bold.ttf", max(8, size * 13 // 48)), board, band)
    x = int(rng.integers(4, max(5, size - text.width - 1)))
    image.paste(text, (x, band_top + (band_h - text.height) // 2 + 1))
    author_w = int(rng.integers(size // 4, size // 2))
    author_y = min(size - 4, band_top + band_h + int(rng.integers(4, 9)))
    draw.rectangle([x, author_y, x + author_w, author_y + 1], fill=(200, 200, 200))
    return image, colour


def shape_scene(rng: np.random.Generator, size: int,
                specs: list[tuple[str, str, float]]) -> tuple[Image.Image, list[Obj]]:
    """The shared domain: today's shape scenes."""
    objs = place(rng, size, specs)
    return render(objs, size), objs
