"""Plain-torch definitions that every fused kernel is tested against.

Contrastive (symmetric InfoNCE, CLIP's loss): for image features X and text features Y (B x D,
row i of each is a matching pair) and a logit scale s > 0 (CLIP learns log s),
    L = s * X @ Y.T
    loss = ( CE(L, targets) + CE(L.T, targets) ) / 2,
with CE the mean cross-entropy over rows and, with label smoothing e, the target of row i
putting 1 - e on column i and e / B on every column (torch's `label_smoothing`).

Variational (BVIF): the reparameterised sample z = mu_q + exp(0.5 * logvar_q) * eps and the KL
divergence between diagonal Gaussians q = N(mu_q, exp(logvar_q)) and p = N(mu_p, exp(logvar_p)):
    KL(q || p) = 0.5 * sum_d [ logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1 ]
summed over the last dimension, then mean (or sum) over the rest. `direction="pq"` gives KL(p || q).
Both log-variances are clamped to [LOGVAR_MIN, LOGVAR_MAX] first (zero gradient outside),
which keeps exp() finite in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The variational definitions are the plain-torch module the models compute with; the fused
# kernel is tested against it (and the oracle below for the contrastive loss stays here alone).
from kernels.gaussian import (  # noqa: F401
    LOGVAR_MAX,
    LOGVAR_MIN,
    gaussian_kl,
    gaussian_kl_elements,
    gaussian_nll,
    reparameterize,
    variational_fusion,
)


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Symmetric InfoNCE; `logit_scale` is the multiplier s (not its log). Computes in fp32."""
    logits = logit_scale.float() * image.float() @ text.float().t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (
        F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)
    )
