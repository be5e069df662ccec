"""Input covariance of an adapted layer, kept low-rank, and the gradient rewrites SAME builds on it.

``range_finder`` estimates the top directions of a batch's centred covariance
with one randomized pass (a shared random ``d x k`` test matrix, one product
with ``X^T X``, a QR), summed over processes through a ``d x k`` all-reduce:
no rows cross processes.

``CovarianceSketch`` holds the running second moment ``S = sum x x^T`` of the
inputs it is shown as its top-``rank`` eigenpairs, plus the exact count, sum
and squared norm, so the centred covariance ``C = S / n - mu mu^T`` and its
trace come out of ``eig()``. ``shrink=False`` keeps the truncated incremental
SVD (exact while the inputs span at most ``rank`` directions); ``shrink=True``
is Frequent Directions (each update subtracts the ``rank + 1``-th squared
singular value from the others, so ``S`` is underestimated by at most
``||A||_F^2 / rank`` in spectral norm). Everything is a buffer: it moves with
``.to()``, is saved with the adapters, and a resumed run continues from it.

The rewrites (SAME's, docs/methods/same.md) are plain functions of tensors:

- ``router_rewrite``: ``G' = (G V) diag(g) V^T + (G - G V V^T)`` with
  ``g_i = clamp(s_min / s_i, 0.8, 1.0)``, ``s`` the standard deviations along
  the kept directions smoothed over a causal window of 3;
- ``expert_rewrite``: ``G' = G [U diag(1 / (S + mu)) U^T + (I - U U^T) / mu]``.
"""

from __future__ import annotations

import torch
from torch import nn


class CovarianceSketch(nn.Module):
    """Args:
        dim: input features.
        rank: eigenpairs of the second moment kept (K <= 64 in SAME).
        centered: ``eig`` returns the centred covariance (else the second moment / n).
    """

    def __init__(self, dim: int, rank: int = 64, *, centered: bool = True, dtype: torch.dtype = torch.float64,
                 shrink: bool = False) -> None:
        super().__init__()
        self.dim, self.rank, self.centered, self.shrink = dim, rank, centered, shrink
        f64 = dict(dtype=dtype)
        self.register_buffer("count", torch.zeros((), **f64))
        self.register_buffer("total", torch.zeros(dim, **f64))
        self.register_buffer("squares", torch.zeros((), **f64))
        self.register_buffer("basis", torch.zeros(dim, rank, **f64))  # (d, K) eigenvectors of S
        self.register_buffer("moments", torch.zeros(rank, **f64))  # (K,) eigenvalues of S

    @torch.no_grad()
    def reset(self) -> None:
        for b in (self.count, self.total, self.squares, self.basis, self.moments):
            b.zero_()

    @torch.no_grad()
    def update(self, x: torch.Tensor, *, count: float | None = None, total: torch.Tensor | None = None,
               squares: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (n, dim) to the second moment. ``count`` overrides n (rows padded
        with zeros to gather equal shapes from several processes add nothing but must not count);
        ``total`` and ``squares`` override the rows' sum and squared norm (when ``x`` summarizes
        rows, e.g. ``range_finder``'s scaled directions, instead of being them)."""
        x = x.reshape(-1, self.dim).to(self.basis.dtype)
        self.count += x.shape[0] if count is None else count
        self.total += x.sum(0) if total is None else total.to(self.total)
        self.squares += x.square().sum() if squares is None else squares.to(self.squares)
        rows = torch.cat([self.moments.sqrt()[:, None] * self.basis.T, x])  # (K + n, d)
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        k = min(self.rank, s.numel())
        if self.shrink and s.numel() > k:  # Frequent Directions: every direction loses the (k+1)-th's energy
            s = (s[:k].square() - s[k].square()).clamp(min=0).sqrt()
        basis = vh[:k].T  # (d, k)
        # A sign per direction fixed by its largest entry: the same data give the same buffers.
        pivot = basis.abs().argmax(0)
        basis = basis * torch.sign(basis[pivot, torch.arange(k, device=basis.device)])
        self.basis.zero_()[:, :k] = basis
        self.moments.zero_()[:k] = s[:k].square()

    @torch.no_grad()
    def eig(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eigenvectors (d, K'), eigenvalues (K',) descending, trace) of the covariance."""
        n = self.count.clamp(min=1)
        mu = self.total / n if self.centered else torch.zeros_like(self.total)
        z, _ = torch.linalg.qr(torch.cat([self.basis, mu[:, None]], 1))  # (d, K + 1) spans S and mu
        zb, zm = z.T @ self.basis, z.T @ mu  # (K + 1, K), (K + 1,)
        small = (zb * (self.moments / n)) @ zb.T - torch.outer(zm, zm)  # Z^T C Z
        vals, vecs = torch.linalg.eigh(small)
        vals, vecs = vals.flip(0).clamp(min=0), (z @ vecs).flip(1)
        trace = (self.squares / n - mu.square().sum()).clamp(min=0)
        return vecs[:, : self.rank], vals[: self.rank], trace


def test_matrix(dim: int, k: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """The random (dim, k) float32 test matrix of ``range_finder``: the same on every process for the same seed."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(dim, k, generator=g, device=device, dtype=torch.float32)


@torch.no_grad()
def range_finder(x: torch.Tensor, k: int, seed: int, *, centered: bool = True,
                 reduce=lambda t: t) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One randomized pass for the top-``k`` directions of the rows ``x`` (n, d) in float32, over
    every process's rows when ``reduce`` sums a tensor over processes (``all_reduce_sum``).

    The rows are centred on their mean over all processes (``centered``), multiplied by a shared test
    matrix ``Omega`` (``test_matrix(d, k, seed)``), ``Y = X^T X Omega`` is summed over processes and
    orthonormalized (QR) into ``Q``, and the covariance inside that range, ``Q^T X^T X Q / (N - 1)``
    (k x k, summed over processes), gives the principal directions and their standard deviations.
    Returns (directions (d, k) by decreasing standard deviation, those deviations (k,),
    ``{"count", "total", "squares"}`` of the rows over all processes). What crosses processes: a
    ``d x k`` product, a ``k x k`` one, the rows' sum (d) and two numbers."""
    x = x.reshape(-1, x.shape[-1]).float()
    d = x.shape[1]
    k = min(k, d)
    head = reduce(torch.cat([x.sum(0), x.new_full((1,), x.shape[0]), x.square().sum().reshape(1)]))
    total, n, squares = head[:d], head[d], head[d + 1]
    if centered:
        x = x - total / n.clamp(min=1)
    omega = test_matrix(d, k, seed, x.device)
    y = reduce(x.T @ (x @ omega))  # (d, k)
    q, _ = torch.linalg.qr(y)
    b = x @ q  # (n, k): the rows in the found range
    small = reduce(b.T @ b) / (n - 1).clamp(min=1)  # (k, k) covariance within the range
    vals, vecs = torch.linalg.eigh(small)  # Rayleigh-Ritz: the principal directions inside the range
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    return q @ vecs, vals.sqrt(), {"count": n, "total": total, "squares": squares}


def kept_directions(eigenvalues: torch.Tensor, trace: torch.Tensor, delta: float, cap: int) -> int:
    """The smallest k with sum_{j<=k} lambda_j >= delta * trace, at most ``cap`` (0 for no data)."""
    if float(trace) <= 0:
        return 0
    reached = (eigenvalues.cumsum(0) >= delta * trace).nonzero()
    k = int(reached[0]) + 1 if reached.numel() else eigenvalues.numel()
    return min(k, cap)


def kept_mask(eigenvalues: torch.Tensor, trace: torch.Tensor, delta: float, cap: int, *,
              at_least_one: bool = False) -> torch.Tensor:
    """``kept_directions`` as a (K,) boolean mask over the eigenvalues' order, computed on their device
    (nothing read back: what a refresh inside the forward uses)."""
    n = eigenvalues.numel()
    reached = eigenvalues.cumsum(0) >= delta * trace
    k = torch.where(reached.any(), reached.int().argmax() + 1, n).clamp(max=cap)
    k = torch.where(trace > 0, k, 0)
    if at_least_one:
        k = k.clamp(min=1)
    return torch.arange(n, device=eigenvalues.device) < k


def smoothed(sigma: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Causal moving average along the eigen-index: mean of sigma[max(0, i - window + 1) .. i]."""
    c = torch.cat([sigma.new_zeros(1), sigma.cumsum(0)])
    i = torch.arange(1, sigma.numel() + 1, device=sigma.device)
    lo = (i - window).clamp(min=0)
    return (c[i] - c[lo]) / (i - lo)


def router_rewrite(grad: torch.Tensor, directions: torch.Tensor, sigma: torch.Tensor, *,
                   low: float = 0.8, high: float = 1.0, kept: torch.Tensor | None = None) -> torch.Tensor:
    """SAME's spectral router update: (E, d) gradient, (d, k) kept directions, (k,) their std devs.
    ``kept``: a (k,) mask of the directions that count (the others are left out, as if sliced off)."""
    s = smoothed(sigma)
    tiny = torch.finfo(s.dtype).tiny
    if kept is not None:
        directions = directions * kept
        s_min = s.masked_fill(~kept, float("inf")).min()
        s = torch.where(kept, s, s_min)
    else:
        s_min = s.min()
    g = (s_min / s.clamp(min=tiny)).clamp(low, high)  # (k,)
    gv = grad @ directions  # (E, k)
    return (gv * g) @ directions.T + (grad - gv @ directions.T)


def expert_rewrite(grad: torch.Tensor, directions: torch.Tensor, sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """SAME's curvature-aware scaling of an expert's A gradient (r, d): kept directions (d, k), std devs (k,)."""
    gu = grad @ directions  # (r, k)
    return (gu / (sigma + mu)) @ directions.T + (grad - gu @ directions.T) / mu
