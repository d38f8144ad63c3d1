"""Diagonal-Gaussian operations in plain torch: what BVIF's models compute with, and the torch
path of `kernels.variational` where Triton cannot run (one fallback per kernel).

For q = N(mu_q, exp(logvar_q)) and p = N(mu_p, exp(logvar_p)), diagonal:
    z = mu_q + exp(0.5 * logvar_q) * eps                    (the reparameterised sample)
    KL(q || p) = 0.5 * sum_d [ logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1 ]
summed over the last dimension, then mean (or sum) over the rest; `direction="pq"` gives KL(p || q).
Both log-variances are clamped to [LOGVAR_MIN, LOGVAR_MAX] first (zero gradient outside), which
keeps exp() finite in bf16. Everything is computed in fp32.
"""

from __future__ import annotations

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def gaussian_kl_elements(mu_q, logvar_q, mu_p, logvar_p):
    """KL(q || p) of each element (nothing summed), fp32."""
    lq = logvar_q.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
    lp = logvar_p.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
    d = mu_q.float() - mu_p.float()
    return 0.5 * (lp - lq + (lq.exp() + d * d) * torch.exp(-lp) - 1.0)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p, direction: str = "qp", reduction: str = "mean"):
    if direction == "pq":
        mu_q, logvar_q, mu_p, logvar_p = mu_p, logvar_p, mu_q, logvar_q
    elif direction != "qp":
        raise ValueError(f"direction must be 'qp' or 'pq', got {direction!r}")
    kl = gaussian_kl_elements(mu_q, logvar_q, mu_p, logvar_p).sum(-1)
    if reduction == "mean":
        return kl.mean()
    if reduction == "sum":
        return kl.sum()
    if reduction == "none":
        return kl
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def reparameterize(mu, logvar, eps):
    """z in the dtype of mu; computed in fp32."""
    lv = logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
    return (mu.float() + torch.exp(0.5 * lv) * eps.float()).to(mu.dtype)


def gaussian_nll(target, mu, logvar):
    """Negative log-likelihood of `target` under N(mu, exp(logvar)), up to the constant
    0.5 * log(2 pi) per dimension: summed over the last dimension, averaged over the rest."""
    lv = logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
    nll = 0.5 * (lv + (target.float() - mu.float()) ** 2 * torch.exp(-lv))
    return nll.sum(-1).mean()


def variational_fusion(
    mu_q, logvar_q, mu_p, logvar_p, eps, direction: str = "qp", reduction: str = "mean"
):
    """(z, kl): the reparameterised posterior sample and the Gaussian KL, as the fused kernel gives."""
    return reparameterize(mu_q, logvar_q, eps), gaussian_kl(
        mu_q, logvar_q, mu_p, logvar_p, direction, reduction
    )
