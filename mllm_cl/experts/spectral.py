"""Input covariance of an adapted layer, kept low-rank, and the gradient rewrites SAME builds on it.

``CovarianceSketch`` holds the running second moment ``S = sum x x^T`` of the
inputs it is shown as its top-``rank`` eigenpairs (exact while the inputs span
at most ``rank`` directions; the incremental-SVD approximation beyond), plus
the exact count, sum and squared norm, so the centred covariance
``C = S / n - mu mu^T`` and its trace come out of ``eig()``. Everything is a
buffer (float64): it moves with ``.to()``, is saved with the adapters, and a
resumed run continues from it bit-exactly.

The rewrites (methods.md, section 2) are plain functions of tensors:

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

    def __init__(self, dim: int, rank: int = 64, *, centered: bool = True) -> None:
        super().__init__()
        self.dim, self.rank, self.centered = dim, rank, centered
        f64 = dict(dtype=torch.float64)
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
    def update(self, x: torch.Tensor, *, count: float | None = None) -> None:
        """Add the rows of ``x`` (n, dim). ``count`` overrides n (rows padded with zeros
        to gather equal shapes from several processes add nothing but must not count)."""
        x = x.reshape(-1, self.dim).to(self.basis.dtype)
        self.count += x.shape[0] if count is None else count
        self.total += x.sum(0)
        self.squares += x.square().sum()
        rows = torch.cat([self.moments.sqrt()[:, None] * self.basis.T, x])  # (K + n, d)
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        k = min(self.rank, s.numel())
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


def kept_directions(eigenvalues: torch.Tensor, trace: torch.Tensor, delta: float, cap: int) -> int:
    """The smallest k with sum_{j<=k} lambda_j >= delta * trace, at most ``cap`` (0 for no data)."""
    if float(trace) <= 0:
        return 0
    reached = (eigenvalues.cumsum(0) >= delta * trace).nonzero()
    k = int(reached[0]) + 1 if reached.numel() else eigenvalues.numel()
    return min(k, cap)


def smoothed(sigma: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Causal moving average along the eigen-index: mean of sigma[max(0, i - window + 1) .. i]."""
    c = torch.cat([sigma.new_zeros(1), sigma.cumsum(0)])
    i = torch.arange(1, sigma.numel() + 1, device=sigma.device)
    lo = (i - window).clamp(min=0)
    return (c[i] - c[lo]) / (i - lo)


def router_rewrite(grad: torch.Tensor, directions: torch.Tensor, sigma: torch.Tensor, *,
                   low: float = 0.8, high: float = 1.0) -> torch.Tensor:
    """SAME's spectral router update: (E, d) gradient, (d, k) kept directions, (k,) their std devs."""
    s = smoothed(sigma)
    g = (s.min() / s.clamp(min=torch.finfo(s.dtype).tiny)).clamp(low, high)  # (k,)
    gv = grad @ directions  # (E, k)
    return (gv * g) @ directions.T + (grad - gv @ directions.T)


def expert_rewrite(grad: torch.Tensor, directions: torch.Tensor, sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """SAME's curvature-aware scaling of an expert's A gradient (r, d): kept directions (d, k), std devs (k,)."""
    gu = grad @ directions  # (r, k)
    return (gu / (sigma + mu)) @ directions.T + (grad - gu @ directions.T) / mu
