"""SAME's statistics under two processes (gloo): each process sees half of the rows, both end with the
buffers one process computes from all of them, the estimated subspace is the data's, and what crosses
the processes per step and layer is O(k d), never the rows.

(A whole-run comparison like tests/system/test_ddp.py does not apply to SAME: its training-time routing
is one weight vector per micro-batch, so two processes of half a batch route differently from one
process of the whole batch, by the method's definition.)
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from two_processes import spawn_two

from mllm_cl.experts import ExpertSetup
from mllm_cl.methods import SAME
from mllm_cl.methods.same import activation_sums

D, RANK, K, ROWS, STEPS = 256, 8, 16, 120, 4


def _layer(covariance):
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(D, 10))
    method = SAME(ExpertSetup(["proj"], scope="", rank=2), num_experts=3, max_directions=K, refresh_every=1,
                  stat_tokens=None, prior="none", covariance=covariance)
    method.build(holder)
    method.on_task_start(holder, 0)
    return method, holder.proj


def data():
    """STEPS steps of ROWS rows: a rank-8 signal (standard deviations 10 down to 5) plus noise of 0.1."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(D, RANK, generator=g))
    scales = torch.linspace(10, 5, RANK)
    rows = (torch.randn(STEPS, ROWS, RANK, generator=g) * scales) @ basis.T
    rows = rows + 0.1 * torch.randn(STEPS, ROWS, D, generator=g)
    probs = torch.softmax(torch.randn(STEPS, ROWS, 3, generator=g), -1)
    return rows + 5.0, probs, basis  # a mean the centring must remove


def largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest principal angle (degrees) between the column spans of a and b (orthonormal)."""
    cos = torch.linalg.svdvals(a.T.double() @ b.double()).clamp(max=1).min()
    return float(torch.rad2deg(torch.arccos(cos)))


def current(method, layer) -> torch.Tensor:
    """The estimate's directions (d, K): the last refresh's (local), the sketch's (running)."""
    if method.covariance == "running":
        return layer.same.covariance.eig()[0]
    return layer.same.local[0]


def feed(method, layer, rows, probs):
    for step in range(STEPS):
        method.refresh(layer.same, rows[step])
        method._activation(layer, activation_sums(rows[step].double(), probs[step].double()))
        method.steps += 1
    method.on_task_end(layer, 0)


def _worker(rank, out_dir, covariance):
    sent = []
    original = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast", "all_gather_object")}

    def counting(name):
        def call(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            sent.append(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))
            return original[name](tensor, *args, **kwargs)
        return call

    method, layer = _layer(covariance)
    rows, probs, _ = data()
    half = slice(rank * ROWS // 2, (rank + 1) * ROWS // 2)  # each process sees its half of every step
    for name in original:
        setattr(dist, name, counting(name))
    feed(method, layer, rows[:, half], probs[:, half])
    for name, fn in original.items():
        setattr(dist, name, fn)
    torch.save({"state": layer.same.state_dict(), "masked": sorted(layer.routers["default"].masked),
                "current": current(method, layer), "sent": sent}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("covariance", ["local", "running"])
def test_statistics_agree_with_one_process_find_the_subspace_and_send_no_rows(tmp_path, covariance):
    method, layer = _layer(covariance)
    rows, probs, basis = data()
    feed(method, layer, rows, probs)
    expected = layer.same.state_dict()
    k = int(expected["snapshot_k"])  # delta = 0.9 of the energy: the signal's top directions
    assert 1 <= k <= RANK and largest_angle(expected["snapshot_directions"][:, :k], basis) < 5
    assert largest_angle(current(method, layer)[:, :RANK], basis) < 5  # the estimate's top 8: the signal's span
    spawn_two(_worker, str(tmp_path), covariance, store=tmp_path / "store")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["state"].keys() == expected.keys()
        assert int(got["state"]["snapshot_k"]) == k
        assert largest_angle(got["state"]["snapshot_directions"][:, :k], basis) < 5
        assert largest_angle(got["current"][:, :RANK], basis) < 5
        assert largest_angle(got["current"][:, :RANK], current(method, layer)[:, :RANK]) < 1  # as one process
        torch.testing.assert_close(got["state"]["snapshot_sigma"], expected["snapshot_sigma"], rtol=1e-3, atol=1e-3)
        for key in ("utilization", "importance"):
            torch.testing.assert_close(got["state"][key], expected[key], atol=1e-8, rtol=1e-9)
        assert got["masked"] == sorted(layer.routers["default"].masked)
        # Per step and layer: a d x k product and a few vectors, never the rows (ROWS / 2 x D per process).
        per_step = sum(got["sent"]) / STEPS
        assert per_step <= 2 * K * D * 4, per_step
