"""SAME's statistics and gradient rewrites against dense references (explicit covariance, eigh, projection)."""

import pytest
import torch

from mllm_cl.experts.spectral import (
    CovarianceSketch,
    expert_rewrite,
    kept_directions,
    kept_mask,
    range_finder,
    router_rewrite,
    smoothed,
)


def _data(n=60, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 0.5


def _dense_covariance(x):
    mu = x.mean(0)
    return (x - mu).T @ (x - mu) / x.shape[0]


def test_sketch_equals_the_explicit_covariance_while_the_data_fit_its_rank():
    x = _data()
    sketch = CovarianceSketch(10, rank=16)
    for chunk in x.split(7):  # several updates, as steps add batches
        sketch.update(chunk)
    vecs, vals, trace = sketch.eig()
    ref_vals, ref_vecs = torch.linalg.eigh(_dense_covariance(x))
    torch.testing.assert_close(vals[:10], ref_vals.flip(0), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(trace, _dense_covariance(x).trace(), atol=1e-9, rtol=1e-9)
    # the same subspace: each eigenvector up to its sign
    cos = (vecs[:, :10].T @ ref_vecs.flip(1)).diagonal().abs()
    torch.testing.assert_close(cos, torch.ones(10, dtype=torch.float64), atol=1e-7, rtol=0)


def test_sketch_is_order_independent_and_deterministic():
    x = _data()
    a, b = CovarianceSketch(10, rank=16), CovarianceSketch(10, rank=16)
    a.update(x)
    b.update(x.flip(0))
    torch.testing.assert_close(a.basis, b.basis, atol=1e-9, rtol=0)  # signs fixed, not left to the SVD
    torch.testing.assert_close(a.moments, b.moments, atol=1e-8, rtol=1e-10)


def test_kept_directions_follow_delta_and_the_cap():
    vals = torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    trace = vals.sum()
    assert kept_directions(vals, trace, 0.5, 64) == 1  # 5 >= 5
    assert kept_directions(vals, trace, 0.8, 64) == 2  # 8 >= 8
    assert kept_directions(vals, trace, 0.9, 64) == 3  # 9 >= 9
    assert kept_directions(vals, trace, 0.9, 2) == 2
    assert kept_directions(vals, torch.tensor(0.0), 0.9, 64) == 0


def test_smoothing_is_a_causal_window_of_three():
    s = torch.tensor([4.0, 2.0, 6.0, 1.0])
    torch.testing.assert_close(smoothed(s), torch.tensor([4.0, 3.0, 4.0, 3.0]))


@pytest.mark.parametrize("delta", [0.5, 0.9, 0.99])
def test_router_rewrite_equals_the_dense_projection(delta):
    x = _data()
    cov = _dense_covariance(x)
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0), vecs.flip(1)
    k = kept_directions(vals, cov.trace(), delta, 64)
    V, sigma = vecs[:, :k], vals[:k].sqrt()
    s = torch.stack([sigma[max(0, i - 2): i + 1].mean() for i in range(k)])  # causal window of 3
    g = (s.min() / s).clamp(0.8, 1.0)
    dense = V @ torch.diag(g) @ V.T + (torch.eye(10, dtype=torch.float64) - V @ V.T)
    G = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(router_rewrite(G, V, sigma), G @ dense, atol=1e-12, rtol=1e-12)
    # and from the sketch's own decomposition
    sketch = CovarianceSketch(10, rank=16)
    sketch.update(x)
    svecs, svals, strace = sketch.eig()
    assert kept_directions(svals, strace, delta, 64) == k
    torch.testing.assert_close(router_rewrite(G, svecs[:, :k], svals[:k].sqrt()), G @ dense, atol=1e-9, rtol=1e-9)
    if k > 1:  # the largest-variance direction gets a smaller step, never below 0.8
        assert g[0] < 1 and g.min() >= 0.8


def test_expert_rewrite_equals_the_dense_preconditioner():
    x = _data()
    vals, vecs = torch.linalg.eigh(_dense_covariance(x))
    U, S = vecs.flip(1)[:, :4], vals.flip(0)[:4].sqrt()
    mu = 0.9
    dense = U @ torch.diag(1 / (S + mu)) @ U.T + (torch.eye(10, dtype=torch.float64) - U @ U.T) / mu
    G = torch.randn(8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(expert_rewrite(G, U, S, mu), G @ dense, atol=1e-12, rtol=1e-12)


def test_frequent_directions_stays_within_its_error_bound():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 40, generator=g) * torch.linspace(5, 0.2, 40)  # a decaying spectrum, no exact low rank
    sketch = CovarianceSketch(40, rank=8, centered=False, dtype=torch.float32, shrink=True)
    for chunk in x.split(50):
        sketch.update(chunk)
    approx = (sketch.basis * sketch.moments) @ sketch.basis.T  # B^T B
    error = torch.linalg.matrix_norm(x.T @ x - approx, ord=2)
    assert error <= x.square().sum() / 8  # ||A^T A - B^T B||_2 <= ||A||_F^2 / rank
    assert torch.all(torch.linalg.eigvalsh(x.T @ x - approx) >= -1e-2 * error)  # it never overestimates


def test_range_finder_is_exact_on_data_of_lower_rank():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 5, generator=g) @ torch.randn(5, 30, generator=g) + 3.0  # rank 5 after centring
    directions, sigma, moments = range_finder(x, 8, seed=0)
    vals, vecs = torch.linalg.eigh(_dense_covariance(x.double()))
    unbiased = vals.flip(0)[:5] * 200 / 199  # range_finder divides by N - 1
    torch.testing.assert_close(sigma[:5].double(), unbiased.sqrt(), rtol=1e-4, atol=1e-4)
    overlap = torch.linalg.svdvals(directions[:, :5].double().T @ vecs[:, -5:])
    torch.testing.assert_close(overlap, torch.ones(5, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert float(moments["count"]) == 200 and torch.allclose(moments["total"], x.sum(0))
    torch.testing.assert_close(directions.T @ directions, torch.eye(8), rtol=0, atol=1e-5)


def test_a_kept_mask_is_the_slice_it_marks():
    g = torch.Generator().manual_seed(5)
    vals = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    trace = vals.sum() + 1.0
    for delta in (0.3, 0.6, 0.9, 1.0):
        k = kept_directions(vals, trace, delta, 5)
        assert kept_mask(vals, trace, delta, 5).tolist() == [i < k for i in range(6)]
    assert not kept_mask(vals, torch.tensor(0.0), 0.9, 5).any()
    assert kept_mask(vals, torch.tensor(0.0), 0.9, 5, at_least_one=True).tolist() == [True] + [False] * 5
    dirs, _ = torch.linalg.qr(torch.randn(12, 6, generator=g))
    grad, sigma = torch.randn(3, 12, generator=g), vals.sqrt()
    mask = kept_mask(vals, trace, 0.8, 6)
    k = int(mask.sum())
    torch.testing.assert_close(router_rewrite(grad, dirs, sigma, kept=mask),
                               router_rewrite(grad, dirs[:, :k], sigma[:k]))
