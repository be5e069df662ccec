"""CRAM's parts on constructed inputs: the group rule, adaptive-rank instantiation, the penalty."""

import pytest
import torch

from mllm_cl.experts import ExpertSetup
from mllm_cl.methods import CRAM
from mllm_cl.methods.cram_slots import assign_group, instantiate_slot, orthogonality_penalty


def _unit(*values):
    v = torch.tensor(values, dtype=torch.float32)
    return v / v.norm()


def test_first_task_opens_a_group_and_the_second_joins_above_cosine_08():
    assert assign_group([], _unit(1, 0, 0)) is None
    proto = [_unit(1, 0, 0)]
    assert assign_group(proto, _unit(1, 0.5, 0)) == 0  # cos 0.89
    assert assign_group(proto, _unit(1, 1, 0)) is None  # cos 0.71: a new group


def test_with_two_groups_the_margin_decides_and_max_groups_forces_a_join():
    protos = [_unit(1, 0, 0), _unit(0, 1, 0)]
    assert assign_group(protos, _unit(1, 0.2, 0)) == 0  # cos 0.98 vs 0.20: margin > 0.1
    assert assign_group(protos, _unit(1, 1, 0.1)) is None  # both 0.70: no margin, a new group
    assert assign_group(protos, _unit(1, 1, 0.1), max_groups=2) in (0, 1)  # at the cap: the best, always
    assert assign_group(protos, _unit(0.2, 1, 0), max_groups=2) == 1


def _buffer(rank: int, d_in=32, d_out=24, seed=0, values=None):
    """A rank-48 buffer whose delta has exactly ``rank`` non-zero singular values."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=torch.float64))
    s = (torch.tensor(values, dtype=torch.float64) if values is not None
         else torch.linspace(2.0, 1.0, rank, dtype=torch.float64))
    B = torch.zeros(d_out, 48, dtype=torch.float64)
    A = torch.randn(48, d_in, generator=g, dtype=torch.float64) * 1e-9  # noise far below the threshold
    B[:, :rank] = u * s
    A[:rank] = v.T / 2.0  # scale 2: delta = 2 B A = u diag(s) v^T
    return A, B, v


@pytest.mark.parametrize("rank, expected", [(3, 4), (6, 6), (9, 9), (14, 9)])
def test_ranks_follow_significance_clipped_to_rmin_rmax(rank, expected):
    A, B, _ = _buffer(rank)
    A_e, B_e = instantiate_slot(A, B, 2.0, [], r_min=4, r_max=9)
    assert A_e.shape == (expected, 32) and B_e.shape == (24, expected)


def test_small_singular_values_are_not_candidates():
    A, B, _ = _buffer(6, values=[4.0, 3.0, 2.0, 1.0, 0.3, 0.2])  # 0.3, 0.2 < 0.1 x 4
    assert instantiate_slot(A, B, 2.0, [], r_min=1, r_max=9)[0].shape[0] == 4
    assert instantiate_slot(A, B, 2.0, [], r_min=1, r_max=9, threshold="absolute", absolute=2.5)[0].shape[0] == 2
    assert instantiate_slot(A, B, 2.0, [], r_min=1, r_max=9, fixed_rank=True)[0].shape[0] == 9


def test_slot_equals_the_delta_on_its_directions_and_avoids_older_slots():
    A, B, v = _buffer(6)
    delta = 2.0 * B @ A
    older = [v[:, :2].T.clone()]  # an older slot of the group reads two of the buffer's directions
    A_e, B_e = instantiate_slot(A, B, 2.0, older, r_min=4, r_max=9)
    V = A_e.T
    torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1], dtype=V.dtype), atol=1e-10, rtol=0)  # orthonormal
    torch.testing.assert_close(older[0] @ V, torch.zeros(2, V.shape[1], dtype=V.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(2.0 * B_e @ A_e, delta @ V @ V.T, atol=1e-10, rtol=1e-10)
    # the two shared directions are not novel: 4 new ones remain (6 significant - 2), already r_min
    assert A_e.shape[0] == 4


def test_penalty_is_zero_without_older_slots_and_positive_with_them():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, generator=g)
    A, B = torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)
    gamma = torch.full((5,), 0.5)
    assert orthogonality_penalty(h, A, B, 2.0, [], gamma) == 0
    older = [(torch.randn(2, 16, generator=g), B[:, :2] + 0.1 * torch.randn(12, 2, generator=g))]  # output space close
    loss = orthogonality_penalty(h, A.requires_grad_(), B, 2.0, older, gamma)
    assert loss > 0
    loss.backward()
    assert A.grad is not None and A.grad.abs().sum() > 0
    assert orthogonality_penalty(h, A, B, 2.0, older, torch.zeros(5)) == 0  # no mass on older slots


def test_options_are_checked():
    with pytest.raises(ValueError, match="r_min <= r_max"):
        CRAM(ExpertSetup(["q_proj"]), r_min=10, r_max=9)
    with pytest.raises(ValueError, match="threshold must be"):
        CRAM(ExpertSetup(["q_proj"]), threshold="median")
