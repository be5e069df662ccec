"""Summaries of the accuracy matrix: MFT, MFN, MAA, BWT, forgetting, FWT.

``matrix[t][i]`` (0-based) is the score on task i after training tasks 0..t,
in percent, ``None`` where not evaluated; ``zero_shot[i]`` is the base model's
score on task i. In the formulas (docs/metrics.md) tasks are 1..T and A[0] is the
zero-shot row:

- MFT = mean_i A[i][i]                (just after learning each task)
- MFN = mean_i A[T][i]                ("Last")
- MAA = mean_t mean_{i<=t} A[t][i]
- BWT = mean_{i<T} (A[T][i] - A[i][i])   (= T (MFN - MFT) / (T - 1))
- forgetting = mean_{i<T} (max_{i<=t<T} A[t][i] - A[T][i])
- FWT = mean_{i>=2} (A[i-1][i] - A[0][i])  (needs the entries above the diagonal)

BWT and forgetting are undefined for T = 1; FWT without the above-diagonal
entries. A one-row method (multitask, zero_shot) has only MFN.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

Row = Sequence[float | None]


def _mean(xs: list[float]) -> float | None:
    return fmean(xs) if xs else None


def continual_metrics(matrix: Sequence[Row], zero_shot: Row | None = None) -> dict[str, float | None]:
    """All summaries of a T x T matrix (``None`` where undefined or not evaluated)."""
    T = len(matrix)
    if T == 0 or any(len(row) != T for row in matrix):
        raise ValueError("the accuracy matrix must be T x T with T >= 1, "
                         f"got rows of lengths {[len(r) for r in matrix]}")
    last = matrix[-1]
    if any(v is None for v in last):
        raise ValueError("the final row of the accuracy matrix must be complete")
    diag = [matrix[i][i] for i in range(T)]
    out: dict[str, float | None] = {"MFN": fmean(last)}
    if any(v is None for v in diag):
        # Not every task was evaluated after its own training: MFT, MAA and BWT are undefined.
        out.update(MFT=None, MAA=None, BWT=None, forgetting=None, FWT=None)
        return out
    out["MFT"] = fmean(diag)
    out["MAA"] = fmean(fmean(matrix[t][i] for i in range(t + 1)) for t in range(T))
    if T > 1:
        out["BWT"] = fmean(last[i] - diag[i] for i in range(T - 1))
        out["forgetting"] = fmean(max(matrix[t][i] for t in range(i, T - 1)) - last[i] for i in range(T - 1))
    else:
        out["BWT"] = out["forgetting"] = None
    above = [matrix[i - 1][i] for i in range(1, T)]
    if zero_shot is not None and T > 1 and all(v is not None for v in above) and all(v is not None for v in zero_shot):
        out["FWT"] = fmean(above[i - 1] - zero_shot[i] for i in range(1, T))
    else:
        out["FWT"] = None
    return out


def final_row_metrics(final_row: Row) -> dict[str, float | None]:
    """A one-row method: MFN only."""
    return {"MFN": _mean([v for v in final_row if v is not None]), "MFT": None, "MAA": None, "BWT": None,
            "forgetting": None, "FWT": None}
