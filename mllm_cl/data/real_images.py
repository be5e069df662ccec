"""Real images that ship inside packages: the one domain of the CoIN-shaped suite no one here drew.

``digits()`` is scikit-learn's bundled copy of the UCI "Optical Recognition of
Handwritten Digits" test set: 1,797 8x8 images of digits written by 43 people,
intensities 0..16 (``sklearn.datasets.load_digits``; nothing is downloaded).
It is split once, by position, into a train pool and a test pool (every fifth
image is a test image), so a task's train and test images never share a digit.

scikit-learn is in the ``coin`` extra (``pip install 'mllm-cl[coin]'``): it
pulls scipy, too heavy for users who only run the shape-scene suite.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: What the benchmark manifest says about the data (source and licence).
DIGITS_SOURCE = {
    "domain": "digits",
    "source": "scikit-learn's bundled sklearn.datasets.load_digits: the UCI ML hand-written digits test set "
              "(E. Alpaydin and C. Kaynak, 1998; 1,797 images of 8x8 pixels by 43 writers)",
    "licence": "CC BY 4.0 (UCI Machine Learning Repository); scikit-learn itself is BSD-3-Clause",
    "split": "image i is a test image when i % 5 == 0, a train image otherwise",
}

TEST_EVERY = 5


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: images float32 in [0, 1] of shape (1797, 8, 8), ink = 1."""
    try:
        from sklearn.datasets import load_digits  # heavy, and an optional extra
    except ImportError:
        raise ImportError("the CoIN-shaped synthetic tasks draw real handwritten digits from scikit-learn's bundled "
                          "copy; install the extra: pip install 'mllm-cl[coin]'") from None
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def pool(split: str) -> np.ndarray:
    """Indices of the digits a split may draw from."""
    n = len(digits()[1])
    index = np.arange(n)
    if split == "test":
        return index[index % TEST_EVERY == 0]
    if split == "train":
        return index[index % TEST_EVERY != 0]
    raise ValueError(f"split must be train or test, got {split!r}")
