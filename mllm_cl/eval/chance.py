"""Chance on a test set: the score of the best constant answer, under the task's own scorer.

The candidates are the test set's gold answers (each distinct string once); the
best one is what a model that ignores the image and the question could score by
always giving it. (Under CoIN's official ImageNet rule an *empty* prediction
is always right; the empty string is not a candidate, so chance stays a
statement about answers.)
"""

from __future__ import annotations

from typing import Any

from mllm_cl.eval.common import answers
from mllm_cl.eval.rules import get_rule


def best_constant(records: list[dict[str, Any]], scorer: str, *, mode: str = "official") -> tuple[str, float]:
    """``(answer, percent)`` of the best constant answer over ``records`` (test rows)."""
    if not records:
        raise ValueError("no test rows to compute chance on")
    rule = get_rule(scorer)
    best, best_score = "", -1.0
    for candidate in sorted({a for r in records for a in answers(r)}):  # ties: the first in sort order
        score = 100.0 * sum(rule(candidate, r, mode=mode) for r in records) / len(records)
        if score > best_score:
            best, best_score = candidate, score
    return best, round(best_score, 2)
