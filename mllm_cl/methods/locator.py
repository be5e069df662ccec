"""LLaVA-CMoE's task locators: which task a sample belongs to, from a frozen feature of its prompt.

After task t a density model of that task alone is fitted on one feature per training sample: the
frozen base model's final hidden state at the last *prompt* token, adapters disabled
(``prompt_features``; the same feature at inference). A sample then goes to the task whose model
explains it best.

- ``TaskLocator`` (``locator: vae``, the paper's PTL): one VAE per task on its standardized features,
  trained on a proper Gaussian ELBO (reconstruction NLL summed over features + ``beta`` x KL summed
  over latents); the score is the reconstruction error of the decoded latent mean, z-scored by the
  task's own errors. ``hidden``/``latent`` ``None`` size it from the feature width.
- ``GaussianLocator`` (``locator: gaussian``): each task's mean and full covariance, shrunk towards
  ``tr(C)/d I`` by ``shrinkage``, scored by the log-likelihood with its log-determinant.

Under ``ddp`` every process computes the features of its share of the task's samples (``fit_task``):
the VAE is fitted on all of them, gathered in dataset order; the Gaussian sums the per-process moments.

See docs/methods/cmoe.md (why a proper ELBO, the VAE's sizes, the measured accuracy of both).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from mllm_cl.data.collate import batch_to
from mllm_cl.distributed import all_gather_rows, all_reduce_sum, is_writer, world
from mllm_cl.experts import RoutingContext, routing_context


def last_prompt_index(attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) position of each sample's last prompt token: the token before the first
    answer label in training batches, the last real token in prompt-only batches
    (left- or right-padded)."""
    if labels is not None:
        answer = labels != -100
        first = torch.where(answer.any(-1), answer.float().argmax(-1), attention_mask.sum(-1))
        return first - 1
    L = attention_mask.shape[-1]
    return L - 1 - attention_mask.flip(-1).float().argmax(-1).long()


@torch.no_grad()
def base_forward(model: nn.Module, batch: dict, **kwargs):
    """One forward of the batch through the frozen base model (adapters disabled). Position ids follow the
    attention mask, so left- and right-padded batches of the same prompts give the same outputs."""
    mask = batch["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with routing_context(model, RoutingContext(disable_adapters=True)):
        return model(batch["input_ids"], attention_mask=mask, pixel_values=batch.get("pixel_values"),
                     position_ids=positions, **kwargs, **batch.get("model_inputs", {}))


@torch.no_grad()
def prompt_features(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, d) final hidden state at the last prompt token, from the base (``base_forward``)."""
    index = last_prompt_index(batch["attention_mask"], batch.get("labels"))
    hidden = base_forward(model, batch, output_hidden_states=True).hidden_states[-1]  # (B, L, d)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()


def task_batches(module, task: int, what: str, limit: int | None = None) -> Iterator[dict]:
    """This process's share of task ``task``'s first ``limit`` training samples (all: ``None``; ``-1 - j``:
    general task ``j``), every world-size-th, as batches on the module's device, the model in eval mode
    meanwhile (a progress bar: ``what`` of the task). ``module``: the ContinualMLLM, its sequence connected."""
    dm = module.sequence
    data = dm.train_dataset(task)
    n = len(data) if limit is None else min(limit, len(data))
    rank, size = world()
    loader = DataLoader(Subset(data, range(rank, n, size)), batch_size=dm.eval_batch_size, shuffle=False,
                        collate_fn=dm.train_collate, num_workers=dm.num_workers)
    was_training = module.model.training
    module.model.eval()
    try:
        for batch in tqdm(loader, desc=f"{what} of {dm.task_spec(task).name}", leave=False,
                          disable=None if is_writer() else True):
            if not batch.get("empty"):
                yield batch_to(batch, module.device)
    finally:
        module.model.train(was_training)


def task_features(module, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt_features`` of this process's share of task ``task``'s training samples (``task_batches``)
    and the samples' indices in the task's dataset (``fit_task`` gathers or sums the shares)."""
    feats, index = [], []
    for batch in task_batches(module, task, "task locator: features"):
        index += batch["index"]
        feats.append(prompt_features(module.model, batch))
    return torch.cat(feats), torch.tensor(index, device=feats[0].device)


def vae_sizes(dim: int, hidden: int | None, latent: int | None) -> tuple[int, int]:
    """The VAE's (hidden, latent) widths for features of width ``dim`` (``None``: sized from it)."""
    return (hidden or min(512, max(32, dim)), latent or min(64, max(4, dim // 8)))


class FeatureVAE(nn.Module):
    """One task's VAE with its feature normalization and error statistics (buffers)."""

    def __init__(self, dim: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.register_buffer("err_mean", torch.zeros(()))
        self.register_buffer("err_std", torch.ones(()))

    def _norm(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats.to(self.feat_mean) - self.feat_mean) / self.feat_std

    def terms(self, feats: torch.Tensor, *, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample (N,): the reconstruction NLL (unit variance, summed over features, constant
        dropped) and the KL to the prior (summed over latents), in nats."""
        x = self._norm(feats)
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        nll = 0.5 * (self.decoder(z) - x).square().sum(-1)
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1)
        return nll, kl

    def loss(self, feats: torch.Tensor, beta: float) -> torch.Tensor:
        nll, kl = self.terms(feats)
        return (nll + beta * kl).mean()

    @torch.no_grad()
    def errors(self, feats: torch.Tensor) -> torch.Tensor:
        """(N,) reconstruction error of each feature (decoded latent mean), summed over features."""
        x = self._norm(feats)
        mu, _ = self.encoder(x).chunk(2, dim=-1)
        return (self.decoder(mu) - x).square().sum(-1)

    def fit(self, feats: torch.Tensor, *, steps: int, lr: float, beta: float, seed: int) -> None:
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(feats.std(0).clamp(min=1e-4) if feats.shape[0] > 1 else torch.ones_like(feats[0]))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            optim = torch.optim.Adam(self.parameters(), lr=lr)
            self.train()
            for _ in range(steps):
                optim.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    self.loss(feats, beta).backward()
                optim.step()
        self.eval()
        errs = self.errors(feats)
        self.err_mean.copy_(errs.mean())
        self.err_std.copy_(errs.std().clamp(min=1e-8) if errs.numel() > 1 else torch.ones(()))


def _gathered(feats: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Every process's features, in dataset order (``index``: each row's position in the dataset)."""
    if index is None:
        return all_gather_rows(feats)
    rows = all_gather_rows(torch.cat([index.to(feats)[:, None], feats], 1))
    return rows[rows[:, 0].argsort()][:, 1:]


class TaskLocator(nn.Module):
    """``locator: vae``: one ``FeatureVAE`` per finished task; ``choose`` picks the lowest z-scored error."""

    kind = "vae"

    def __init__(self, *, hidden: int | None = None, latent: int | None = None, steps: int = 300, lr: float = 1e-3,
                 beta: float = 1.0) -> None:
        super().__init__()
        self.hidden, self.latent, self.steps, self.lr, self.beta = hidden, latent, steps, lr, beta
        self.vaes = nn.ModuleList()

    @property
    def num_tasks(self) -> int:
        return len(self.vaes)

    @property
    def feature_dim(self) -> int:
        return self.vaes[0].feat_mean.numel()

    def fit_task(self, feats: torch.Tensor, index: torch.Tensor | None = None, *, seed: int = 0) -> None:
        """This process's features of the task (and their dataset positions): fit on all processes' rows."""
        self.add_task(_gathered(feats, index), seed=seed)

    def add_task(self, feats: torch.Tensor, *, seed: int = 0) -> FeatureVAE:
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"task locator: need (N >= 2, d) features of a task, got {tuple(feats.shape)}")
        seed = seed + len(self.vaes)
        with torch.random.fork_rng(devices=[]):  # the initial weights follow the seed, not the global RNG
            torch.manual_seed(seed)
            vae = FeatureVAE(feats.shape[1], *vae_sizes(feats.shape[1], self.hidden, self.latent))
        vae = vae.to(device=feats.device, dtype=feats.dtype)
        vae.fit(feats, steps=self.steps, lr=self.lr, beta=self.beta, seed=seed)
        self.vaes.append(vae)
        return vae

    def grow_to(self, num_tasks: int, dim: int) -> None:
        """Empty VAEs to load saved weights into (resume)."""
        while len(self.vaes) < num_tasks:
            self.vaes.append(FeatureVAE(dim, *vae_sizes(dim, self.hidden, self.latent)))

    @torch.no_grad()
    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, tasks) z-scored reconstruction errors (lower: more likely the task)."""
        if not self.vaes:
            raise RuntimeError("task locator: no task fitted yet")
        feats = feats.to(self.vaes[0].feat_mean.device)
        return torch.stack([(v.errors(feats) - v.err_mean) / v.err_std for v in self.vaes], dim=-1)

    def choose(self, feats: torch.Tensor) -> torch.Tensor:
        """(N,) task index with the lowest score."""
        return self.scores(feats).argmin(-1)


class GaussianLocator(nn.Module):
    """``locator: gaussian``: per task the mean and the covariance of its own features, shrunk
    towards ``tr(C)/d I`` by ``shrinkage``; ``scores`` is the negative log-likelihood."""

    kind = "gaussian"

    def __init__(self, *, shrinkage: float = 0.01) -> None:
        super().__init__()
        if not 0 < shrinkage <= 1:
            raise ValueError(f"task locator: shrinkage must be in (0, 1], got {shrinkage}")
        self.shrinkage = shrinkage
        self.means = nn.ParameterList()  # frozen: ParameterLists keep the state_dict keys by task
        self.covariances = nn.ParameterList()
        self._factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (Cholesky factor, logdet)

    @property
    def num_tasks(self) -> int:
        return len(self.means)

    @property
    def feature_dim(self) -> int:
        return self.means[0].numel()

    def fit_task(self, feats: torch.Tensor, index: torch.Tensor | None = None, *, seed: int = 0) -> None:
        """This process's features of the task: the moments are summed over processes."""
        x = feats.double()
        moments = all_reduce_sum(torch.cat([x.new_tensor([x.shape[0]]), x.sum(0), (x.T @ x).flatten()]))
        d = x.shape[1]
        self.add_moments(moments[0], moments[1:1 + d], moments[1 + d:].view(d, d), dtype=feats.dtype)

    def add_task(self, feats: torch.Tensor, *, seed: int = 0) -> None:
        x = feats.double()
        self.add_moments(x.new_tensor(float(x.shape[0])), x.sum(0), x.T @ x, dtype=feats.dtype)

    def add_moments(self, n: torch.Tensor, total: torch.Tensor, outer: torch.Tensor, *, dtype=torch.float32) -> None:
        if float(n) < 2:
            raise ValueError(f"task locator: need >= 2 features of a task, got {int(n)}")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        d = cov.shape[0]
        shrunk = (1 - self.shrinkage) * cov + self.shrinkage * (torch.trace(cov) / d).clamp(min=1e-12) * torch.eye(
            d, dtype=cov.dtype, device=cov.device)
        self.means.append(nn.Parameter(mean.to(dtype), requires_grad=False))
        self.covariances.append(nn.Parameter(shrunk.to(dtype), requires_grad=False))
        self._factors = None

    def grow_to(self, num_tasks: int, dim: int) -> None:
        while len(self.means) < num_tasks:
            self.means.append(nn.Parameter(torch.zeros(dim), requires_grad=False))
            self.covariances.append(nn.Parameter(torch.eye(dim), requires_grad=False))
        self._factors = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._factors = None
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, tasks) negative log-likelihoods (lower: more likely the task)."""
        if not self.num_tasks:
            raise RuntimeError("task locator: no task fitted yet")
        if self._factors is None:
            chol = [torch.linalg.cholesky(c.double()) for c in self.covariances]
            self._factors = [(L, 2 * L.diagonal().log().sum()) for L in chol]
        x = feats.double().to(self.means[0].device)
        out = []
        for mean, (L, logdet) in zip(self.means, self._factors, strict=False):
            z = torch.linalg.solve_triangular(L, (x - mean.double()).T, upper=False)  # (d, N)
            out.append(0.5 * (z.square().sum(0) + logdet + x.shape[1] * math.log(2 * math.pi)))
        return torch.stack(out, dim=-1).to(feats.dtype if feats.is_floating_point() else torch.float32)

    def choose(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scores(feats).argmin(-1)
