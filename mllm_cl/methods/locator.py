"""LLaVA-CMoE's probabilistic task locator (methods.md, section 4, "PTL").

After task t, a small VAE is fitted on one feature per training sample: the
frozen base model's final hidden state at the last *prompt* token, adapters
disabled (``prompt_features``; the same feature at inference). Each VAE keeps
the mean and std of its reconstruction errors on its own data; a sample goes
to the task whose VAE gives it the lowest z-scored error.

Choices **[choice]**: MLP ``d -> hidden -> latent`` (512, 64), loss MSE + beta
KL (beta 1); features standardized by the task's own training mean/std before
the VAE (so one learning rate suits any model width); full-batch Adam,
``steps`` updates; the reconstruction error is the MSE of the decoded latent
mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
def prompt_features(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, d) final hidden state at the last prompt token, adapters disabled.

    Position ids follow the attention mask, so left- and right-padded batches of
    the same prompts give the same features."""
    mask = batch["attention_mask"]
    index = last_prompt_index(mask, batch.get("labels"))
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with routing_context(model, RoutingContext(disable_adapters=True)):
        out = model(batch["input_ids"], attention_mask=mask, pixel_values=batch.get("pixel_values"),
                    position_ids=positions, output_hidden_states=True, **batch.get("model_inputs", {}))
    hidden = out.hidden_states[-1]  # (B, L, d)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()


class FeatureVAE(nn.Module):
    """One task's VAE with its feature normalization and error statistics (buffers)."""

    def __init__(self, dim: int, hidden: int = 512, latent: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for name in ("feat_mean", "feat_std"):
            self.register_buffer(name, torch.zeros(dim) if name == "feat_mean" else torch.ones(dim))
        self.register_buffer("err_mean", torch.zeros(()))
        self.register_buffer("err_std", torch.ones(()))

    def _norm(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feat_mean) / self.feat_std

    def loss(self, feats: torch.Tensor, beta: float) -> torch.Tensor:
        mu, logvar = self.encoder(self._norm(feats)).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = F.mse_loss(self.decoder(z), self._norm(feats))
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.square() - logvar.exp(), dim=-1))
        return recon + beta * kl

    @torch.no_grad()
    def errors(self, feats: torch.Tensor) -> torch.Tensor:
        """(N,) reconstruction error of each feature (decoded latent mean)."""
        x = self._norm(feats)
        mu, _ = self.encoder(x).chunk(2, dim=-1)
        return (self.decoder(mu) - x).square().mean(-1)

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


class TaskLocator(nn.Module):
    """One ``FeatureVAE`` per finished task; ``choose`` picks the lowest z-scored error."""

    def __init__(self, *, hidden: int = 512, latent: int = 64, steps: int = 300, lr: float = 1e-3,
                 beta: float = 1.0) -> None:
        super().__init__()
        self.hidden, self.latent, self.steps, self.lr, self.beta = hidden, latent, steps, lr, beta
        self.vaes = nn.ModuleList()

    @property
    def num_tasks(self) -> int:
        return len(self.vaes)

    def add_task(self, feats: torch.Tensor, *, seed: int = 0) -> FeatureVAE:
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"task locator: need (N >= 2, d) features of a task, got {tuple(feats.shape)}")
        vae = FeatureVAE(feats.shape[1], self.hidden, self.latent).to(feats.device)
        vae.fit(feats, steps=self.steps, lr=self.lr, beta=self.beta, seed=seed + len(self.vaes))
        self.vaes.append(vae)
        return vae

    def grow_to(self, num_tasks: int, dim: int) -> None:
        """Empty VAEs to load saved weights into (resume)."""
        while len(self.vaes) < num_tasks:
            self.vaes.append(FeatureVAE(dim, self.hidden, self.latent))

    @torch.no_grad()
    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, tasks) z-scored reconstruction errors."""
        if not self.vaes:
            raise RuntimeError("task locator: no task fitted yet")
        vae0 = self.vaes[0]
        feats = feats.to(vae0.feat_mean.device)
        return torch.stack([(v.errors(feats) - v.err_mean) / v.err_std for v in self.vaes], dim=-1)

    def choose(self, feats: torch.Tensor) -> torch.Tensor:
        """(N,) task index with the lowest z-scored error."""
        return self.scores(feats).argmin(-1)
