"""What a synthetic task is: a sample maker, its scorer, its answer format and its visual domain.

Shared by both synthetic suites (``synth`` holds the shape-scene tasks,
``synth_coin`` the CoIN-shaped ones) so that each can define tasks without
importing the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mllm_cl.data.draw import Obj


@dataclass
class Sample:
    """One generated sample. ``extra`` goes into the test row (grounding's box and size,
    TextVQA's ten answers); ``objects`` is the scene as drawn, never written, so that
    tests and analyses can re-derive every answer from the scene instead of trusting
    the generator; ``facts`` is the same for the other domains (a chart's bar heights,
    a digit's source index)."""

    image: Image.Image
    instruction: str
    answer: str
    extra: dict
    objects: tuple[Obj, ...] = ()
    facts: dict | None = None


@dataclass(frozen=True)
class TaskSpec:
    make: Callable[[np.random.Generator, int], Sample]
    scorer: str
    max_new_tokens: int
    answer_format: str
    domain: str = "shapes"  # the kind of image (a benchmark script checks that the base tells them apart)
    takes_split: bool = False  # make(rng, size, split): a task drawing real images from a split's own pool


def pick(rng: np.random.Generator, items, n: int = 1) -> list:
    return [items[i] for i in rng.choice(len(items), size=n, replace=False)]


def radius(size: int, lo: float, hi: float, rng: np.random.Generator) -> float:
    return round(float(rng.uniform(lo, hi)) * size, 1)
