"""A generative-model outlier filter: a small VAE on image embeddings; samples with the lowest ELBO are dropped.

Encoder q(z|x) = N(mu(x), diag(sigma(x)^2)), prior N(0, I), Gaussian decoder p(x|z) = N(f(z), s^2 I) with one
learned log-variance. Training maximises the ELBO: reconstruction through z = mu + sigma * eps plus the closed-form
KL(q || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2). The ELBO of a sample is an approximate log-likelihood,
so the samples it explains worst are the pool's outliers. CPU, seeded, deterministic for one thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from datafilter.common.launch import free_cores
from datafilter.filters.base import Filter
from datafilter.filters.ops import float32_rows, gather_float32, sample_rows
from datafilter.filters.view import FilterView


@dataclass(frozen=True)
class VAEConfig:
    """Drop the ``drop_fraction`` of valid samples with the lowest ELBO (mean over ``eval_samples`` draws).
    The VAE (``hidden`` units, ``latent`` dimensions) trains for ``epochs`` on up to ``train_samples`` samples.
    ``threads``: torch threads (0: the free cores). Float sums depend on the thread count, so the same subset
    byte for byte needs the same count: the default is one, which is also fastest on a busy machine."""

    drop_fraction: float = 0.1
    latent: int = 16
    hidden: int = 256
    epochs: int = 10
    batch_size: int = 512
    lr: float = 1e-3
    train_samples: int = 200_000
    eval_samples: int = 4
    seed: int = 0
    threads: int = 1

    def __post_init__(self):
        if not 0 <= self.drop_fraction <= 1:
            raise ValueError("drop_fraction must be in [0, 1]")
        if min(self.latent, self.hidden, self.epochs, self.batch_size, self.train_samples, self.eval_samples) < 1:
            raise ValueError("latent, hidden, epochs, batch_size, train_samples and eval_samples must be positive")


def _build(dim: int, cfg: VAEConfig):
    import torch
    from torch import nn

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.GELU())
            self.mu = nn.Linear(cfg.hidden, cfg.latent)
            self.logvar = nn.Linear(cfg.hidden, cfg.latent)
            self.dec = nn.Sequential(nn.Linear(cfg.latent, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, dim))
            self.dec_logvar = nn.Parameter(torch.tensor(math.log(1.0 / dim)))

        def elbo(self, x: "torch.Tensor", eps: "torch.Tensor") -> "torch.Tensor":
            h = self.enc(x)
            mu, logvar = self.mu(h), self.logvar(h).clamp(-12, 8)
            z = mu + torch.exp(0.5 * logvar) * eps
            recon = self.dec(z)
            log_px = -0.5 * (((x - recon) ** 2) / self.dec_logvar.exp() + self.dec_logvar
                             + math.log(2 * math.pi)).sum(1)
            kl = 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).sum(1)
            return log_px - kl

    return VAE()


def train_and_score(x_train: np.ndarray, img: np.ndarray, rows: np.ndarray, cfg: VAEConfig) -> np.ndarray:
    import torch

    torch.set_num_threads(cfg.threads or free_cores())
    torch.manual_seed(cfg.seed)
    model = _build(x_train.shape[1], cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(x_train)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), cfg.batch_size):
            xb = data[perm[start:start + cfg.batch_size]]
            loss = -model.elbo(xb, torch.randn(len(xb), cfg.latent, generator=gen)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = np.empty(len(rows), np.float64)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        for start, block in float32_rows(img, rows, 8192):
            xb = torch.from_numpy(block)
            total = torch.zeros(len(xb), dtype=torch.float64)
            for _ in range(max(1, cfg.eval_samples)):
                total += model.elbo(xb, torch.randn(len(xb), cfg.latent, generator=eval_gen)).double()
            out[start:start + len(block)] = (total / max(1, cfg.eval_samples)).numpy()
    return out


class VAEFilter(Filter):
    name = "vae_outlier"
    version = "1"
    description = "train a small VAE on image embeddings, drop the samples with the lowest ELBO (outliers)"
    Config = VAEConfig
    needs = ("image_embeddings",)

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        valid = self.drop_invalid(view, "image")
        rows = np.flatnonzero(valid)
        img = view.image_embeddings()
        with self.phase("train_and_score"):
            elbo = train_and_score(gather_float32(img, sample_rows(rows, c.train_samples, c.seed)), img, rows, c)
        with self.phase("select"):
            n_drop = int(len(rows) * c.drop_fraction)
            order = np.lexsort((rows, elbo))  # lowest ELBO first, ties by row
            keep = np.ones(len(rows), bool)
            keep[order[:n_drop]] = False
            self.drop("low_elbo", n_drop)
            return view.uids_of(rows[keep])
