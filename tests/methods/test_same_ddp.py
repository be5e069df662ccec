"""SAME's statistics under two processes (gloo): each process sees half of the tokens, and both end with
the buffers one process computes from all of them.

(A whole-run comparison like tests/system/test_ddp.py does not apply to SAME: its training-time routing
is one weight vector per micro-batch, so two processes of half a batch route differently from one
process of the whole batch, by the method's definition.)
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mllm_cl.experts import ExpertSetup, expert_layers
from mllm_cl.methods import SAME
from mllm_cl.methods.same import activation_sums

D = 12


def _layer():
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(D, 10))
    method = SAME(ExpertSetup(["proj"], scope="", rank=2), num_experts=3, max_directions=8, refresh_every=1,
                  stat_tokens=1000, prior="none")
    method.build(holder)
    method.on_task_start(holder, 0)
    return method, holder.proj


def _data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 30, D, generator=g, dtype=torch.float64) * torch.linspace(2, 0.1, D, dtype=torch.float64)
    probs = torch.softmax(torch.randn(2, 30, 3, generator=g, dtype=torch.float64), -1)
    return tokens, probs


def _feed(method, layer, tokens, probs):
    for step in range(2):
        method._covariance(layer.same, tokens[step])
        method._activation(layer, activation_sums(tokens[step], probs[step]))
        method.steps += 1
    method.on_task_end(layer, 0)


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        method, layer = _layer()
        tokens, probs = _data()
        half = slice(rank * 15, (rank + 1) * 15)  # each process sees its half of every step's tokens
        _feed(method, layer, tokens[:, half], probs[:, half])
        torch.save({k: v for k, v in layer.same.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
        torch.save(sorted(layer.routers["default"].masked), f"{out_dir}/masked{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_statistics_are_reduced_across_two_processes(tmp_path):
    method, layer = _layer()
    tokens, probs = _data()
    _feed(method, layer, tokens, probs)
    expected = layer.same.state_dict()
    assert int(expected["snapshot_k"]) > 0 and expected["covariance.count"] == 60
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=1e-8, rtol=1e-9, msg=key)
        assert torch.load(tmp_path / f"masked{rank}.pt") == sorted(layer.routers["default"].masked)
