"""CRAM's parts as functions of tensors: the group rule, adaptive-rank slots, the novelty
threshold, the orthogonality penalty (``mllm_cl.methods.cram`` uses them; docs/methods/cram.md).

Read beside the authors' public code (``LAMDA-CL/EMNLP2026-CRAM``: ``method/custom/cram/
integration.py``, ``PEFT/tuners/custom/cram_lora.py``); where ours departs, the option that
gives theirs is named in each docstring.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the features of each row (layer norm without affine)."""
    return F.layer_norm(x.float(), (x.shape[-1],))


def assign_group(prototypes: list[torch.Tensor], embedding: torch.Tensor, *, join_cosine: float = 0.8,
                 margin: float = 0.1, max_groups: int = 5) -> int | None:
    """The group a new task joins, or ``None`` for a new group (the rule in docs/methods/cram.md)."""
    if not prototypes:
        return None
    cos = torch.stack([F.cosine_similarity(p, embedding, dim=0) for p in prototypes])
    if len(prototypes) == 1:
        return 0 if float(cos[0]) > join_cosine else None
    best = int(cos.argmax())
    if len(prototypes) >= max_groups:
        return best
    top = cos.topk(2).values
    return best if float(top[0] - top[1]) > margin else None


def novelty_threshold(novelty: float, dim: int, ref_dim: int | None) -> float:
    """tau_novel for inputs of width ``dim``: ``novelty`` itself (``ref_dim`` None: the authors'
    absolute form), or the threshold that allows the same in-subspace energy *per dimension*
    as ``novelty`` allows at ``ref_dim``.

    A direction is novel when ``||v - Q Q^T v|| / ||v|| > tau``, i.e. when less than
    ``1 - tau^2`` of its energy lies in the older slots' subspace. A random direction puts
    ``m / d`` of its energy in an m-dimensional subspace, so at d = 128 a 9-dimensional old
    subspace holds ~7% of it (alpha ~ 0.96 < 0.99: every direction "old"), at d = 4096 0.2%.
    Scaling the allowed energy by ``ref_dim / d`` keeps the test equally strict relative to
    chance: tau(d) = sqrt(1 - (1 - tau^2) ref_dim / d) (0.99 at 4096 -> 0.60 at 128).
    """
    if ref_dim is None:
        return novelty
    allowed = (1.0 - novelty ** 2) * ref_dim / dim
    return math.sqrt(max(0.0, 1.0 - allowed))


def basis(columns: torch.Tensor | None, tol: float = 1e-6) -> torch.Tensor | None:
    """Orthonormal basis (d, m) of the span of ``columns`` (d, n), rank-revealing."""
    if columns is None or columns.shape[1] == 0:
        return None
    u, s, _ = torch.linalg.svd(columns, full_matrices=False)
    keep = s > tol * s.max().clamp(min=tol)
    return u[:, keep] if keep.any() else None


def instantiate_slot(buffer_A: torch.Tensor, buffer_B: torch.Tensor, scale: float, older_A: list[torch.Tensor], *,
                     r_min: int = 4, r_max: int = 9, threshold: str = "relative", relative: float = 0.1,
                     absolute: float = 0.08, novelty: float = 0.99, fixed_rank: bool = False,
                     slot_scale: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """(A_e (r, d_in), B_e (d_out, r)) with ``2 B_e A_e = delta V V^T`` for the kept directions V.

    ``delta = scale B_buf A_buf``; its SVD through the QR of B. Candidates are the singular
    directions above the threshold (``relative``: > ``relative`` x sigma_max; ``absolute``:
    > ``absolute``, the authors' 0.08), at most ``r_max``, kept when novel (``novelty``, the
    share of a direction outside the row spaces of ``older_A``, the group's older slots),
    padded to ``r_min`` with the next largest, then orthogonalized against those row spaces
    and among themselves. The slot's own scale is 2 (alpha = 2r at any rank).

    ``slot_scale: authors`` writes ``2 delta V V^T``: the authors' code stores
    ``U sqrt(S)``, ``sqrt(S) V`` and applies the slot's scale 2 on top, so a slot starts at
    twice what the buffer learned. [choice] ``exact`` (default) starts it at the buffer's delta.
    (They also normalize each projected direction without orthogonalizing the set; the span,
    and so the slot's input space, is the same.)
    """
    if slot_scale not in ("exact", "authors"):
        raise ValueError(f"slot_scale must be 'exact' or 'authors', got {slot_scale!r}")
    A, B = buffer_A.double(), buffer_B.double()
    q, r = torch.linalg.qr(B)  # (d_out, R), (R, R)
    _, s, vh = torch.linalg.svd(scale * (r @ A), full_matrices=False)  # delta = q u s vh
    delta = scale * (B @ A)  # (d_out, d_in)
    qa = basis(torch.cat([a.double() for a in older_A]).T) if older_A else None  # (d_in, m)
    order = list(range(s.numel()))
    if fixed_rank:
        kept = order[:r_max]
    else:
        limit = relative * s[0] if threshold == "relative" else absolute
        candidates = [i for i in order if s[i] > limit][:r_max]

        def novel(i: int) -> bool:
            v = vh[i]
            rest = v if qa is None else v - qa @ (qa.T @ v)
            return float(rest.norm() / v.norm()) > novelty

        kept = [i for i in candidates if novel(i)] or order[:1]
        kept += [i for i in order if i not in kept][: max(0, r_min - len(kept))]
    v = vh[kept].T  # (d_in, r)
    if qa is not None:
        v = v - qa @ (qa.T @ v)
    v, _ = torch.linalg.qr(v)  # orthonormal, in the order of the kept directions
    own_scale = 2.0 if slot_scale == "exact" else 1.0
    return v.T.to(buffer_A.dtype), (delta @ v / own_scale).to(buffer_B.dtype)


def penalty_basis(older: list[tuple[torch.Tensor, torch.Tensor]], *, square: bool,
                  basis_of: str = "output") -> torch.Tensor | None:
    """Q of ``orthogonality_penalty`` from the group's older slots, (A, B) pairs: a basis of their
    output space (columns of B), or with ``basis_of: authors`` and a square module (``square``:
    d_in == d_out) of their input row spaces (rows of A). ``None``: no older slot, or nothing spanned."""
    if basis_of not in ("output", "authors"):
        raise ValueError(f"penalty basis must be 'output' or 'authors', got {basis_of!r}")
    if not older:
        return None
    if basis_of == "authors" and square:
        return basis(torch.cat([a.detach().double() for a, _ in older]).T)  # (d_in, m)
    return basis(torch.cat([b.detach().double() for _, b in older], dim=1))  # (d_out, m)


_UNSET = object()


def orthogonality_penalty(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                          older: list[tuple[torch.Tensor, torch.Tensor]], gamma: torch.Tensor, *,
                          basis_of: str = "output", q: Any = _UNSET,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_b gamma_b ||Q^T z_b||^2`` with ``z_b = s B A h_b``; zero without older slots.

    ``older``: the group's older slots as (A, B) pairs. ``basis_of: output`` (default, the
    paper's Q_B): Q spans the older slots' output space (columns of B). ``authors``: what
    their code does: for a square module (d_in == d_out) Q spans the older slots' *input*
    row spaces (rows of A), otherwise their output space. ``q``: that basis when already
    made (``penalty_basis``: the older slots are frozen while a slot trains, so it is made once
    per phase, not per step: its SVD reads its rank back to the host). ``rows``: (n,) the rows
    the mean runs over (a mask; the others weigh nothing), instead of selecting them.
    """
    if q is _UNSET:
        q = penalty_basis(older, square=A.shape[1] == B.shape[0], basis_of=basis_of)
    elif basis_of not in ("output", "authors"):
        raise ValueError(f"penalty basis must be 'output' or 'authors', got {basis_of!r}")
    if not older or q is None:
        return h.new_zeros(())
    z = scale * (h.to(A.dtype) @ A.T) @ B.T  # (n, d_out)
    per_row = gamma.to(z.dtype) * (z @ q.to(z.dtype)).square().sum(-1)  # (n,)
    if rows is None:
        return per_row.mean()
    rows = rows.to(per_row.dtype)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)
