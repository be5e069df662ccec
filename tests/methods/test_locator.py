"""The task locators: a VAE on a proper ELBO and a shrunk full Gaussian, on feature clouds that a
diagonal distance cannot tell apart; state round trips; two processes equal one (float64)."""

import pytest
import torch
from two_processes import spawn_two

from mllm_cl.experts import ExpertSetup
from mllm_cl.methods import LLaVACMoE
from mllm_cl.methods.locator import GaussianLocator, TaskLocator, vae_sizes


def clouds(n=400, d=64, k=6, seed=0, dtype=torch.float32):
    """Three clouds on one k-dim subspace of high variance (std 1-3), tiny variance (0.05) elsewhere;
    nearly parallel means (cosine > 0.99) that differ along three of the low-variance directions."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.full((d,), 0.05, dtype=torch.float64)
    scales[:k] = torch.linspace(3.0, 1.0, k, dtype=torch.float64)
    train, test = [], []
    for c in range(3):
        mu = q[:, 0] * 20.0 + q[:, d - 1 - c] * 1.0
        x = mu + (torch.randn(2 * n, d, generator=g, dtype=torch.float64) * scales) @ q.T
        train.append(x[:n].to(dtype))
        test.append(x[n:].to(dtype))
    return train, test


def _accuracy(locator, test):
    return [float((locator.choose(t) == k).float().mean()) for k, t in enumerate(test)]


def test_the_clouds_have_nearly_parallel_means():
    train, _ = clouds()
    means = [t.mean(0) for t in train]
    cos = [float(torch.nn.functional.cosine_similarity(means[i], means[j], dim=0)) for i in range(3) for j in range(i)]
    assert min(cos) > 0.95


@pytest.mark.parametrize("make", [lambda: TaskLocator(), lambda: GaussianLocator()], ids=["vae", "gaussian"])
def test_both_locators_find_the_task_on_parallel_clouds(make):
    train, test = clouds()
    locator = make()
    for t in train:
        locator.add_task(t)
    assert min(_accuracy(locator, test)) >= 0.95, _accuracy(locator, test)


def test_the_elbo_posterior_does_not_collapse():
    train, _ = clouds()
    locator = TaskLocator()
    locator.add_task(train[0])
    nll, kl = locator.vaes[0].terms(train[0], sample=False)
    assert float(kl.detach().mean()) > 0.1  # nats per sample (the per-feature-mean MSE loss gave ~0.003)


def test_vae_sizes_follow_the_feature_width():
    assert vae_sizes(128, None, None) == (128, 16)
    assert vae_sizes(4096, None, None) == (512, 64)
    assert vae_sizes(8, None, None) == (32, 4)
    assert vae_sizes(128, 256, 8) == (256, 8)


@pytest.mark.parametrize("kind", ["vae", "gaussian"])
def test_locator_state_round_trips(kind):
    train, test = clouds(n=100)
    method = LLaVACMoE(ExpertSetup(["up_proj"]), locator=kind, vae_steps=50)
    for t in train:
        method.locator.fit_task(t, seed=3)
    facts, tensors = method.state()
    fresh = LLaVACMoE(ExpertSetup(["up_proj"]), locator=kind, vae_steps=50)
    fresh.load_state(facts, tensors)
    probe = torch.cat(test)
    assert torch.equal(fresh.locator.scores(probe), method.locator.scores(probe))


def _worker(rank, kind, out):
    train, _ = clouds(n=60, dtype=torch.float64)
    locator = TaskLocator(steps=40) if kind == "vae" else GaussianLocator()
    for t in train:
        index = torch.arange(rank, t.shape[0], 2)  # this process's share, as the fitter splits the data
        locator.fit_task(t[index], index, seed=5)
    torch.save(locator.state_dict(), f"{out}/{kind}{rank}.pt")


@pytest.mark.parametrize("kind", ["vae", "gaussian"])
def test_two_processes_fit_the_locator_one_process_fits(tmp_path, kind):
    train, _ = clouds(n=60, dtype=torch.float64)
    locator = TaskLocator(steps=40) if kind == "vae" else GaussianLocator()
    for t in train:
        locator.fit_task(t, torch.arange(t.shape[0]), seed=5)
    spawn_two(_worker, kind, str(tmp_path), store=tmp_path / "store")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{kind}{rank}.pt")
        expected = locator.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=1e-9, rtol=1e-9, msg=key)


def test_shrinkage_is_checked():
    with pytest.raises(ValueError, match="shrinkage must be in"):
        GaussianLocator(shrinkage=0.0)
    with pytest.raises(ValueError, match="locator must be 'vae' or 'gaussian'"):
        LLaVACMoE(ExpertSetup(["up_proj"]), locator="knn")
