"""Bidirectional Variational Information Fusion (BVIF): knowledge vectors into a frozen LLM.

- knowledge -> text (contextual inference): the posterior q(z | K) = N(mu_q, exp(logvar_q)) per
  query, z = mu_q + sigma_q * eps (reparameterised, `kernels.variational`), soft prompts
  `to_llm(z)` placed after an instruction; the frozen LLM is trained through them to produce
  the text (cross-entropy on the text tokens).
- text -> knowledge (knowledge reconstruction): the LLM reads an instruction, the text and
  `num_queries` learned placeholder embeddings; its last hidden states there give the prior
  p(z | C) = N(mu_p, exp(logvar_p)); the loss is the Gaussian NLL of K under the prior (the
  learned-variance generalisation of the released MSE) and KL(q || p) ties the two directions.
  The reconstruction target K is detached: text-side prediction learns to match the image's
  knowledge without pulling the IQ-Former towards what text alone can tell.
- `variational=False` reproduces the released deterministic form: soft prompts `to_llm(K)`,
  reconstruction MSE(mu_p, K), no latent, no KL.

The scales (`BVIFLosses`): the cross-entropy is a mean per token, so the KL and the reconstruction
are means per knowledge dimension by default (`reduction="per_dim"`; "sum" sums over the W
dimensions as the textbook ELBO does, W times larger), and the reconstruction is the released
per-element MSE of mu_p against K (`reconstruction="mse"`); `"gaussian"` is the NLL under the
prior's learned variance, which is unbounded below as that variance shrinks, so the prior's
log-variance has a soft floor (`prior_logvar_min`). `free_bits` keeps each element's KL (sample,
query, dimension) at least that many nats, so the posterior is not pushed onto the prior.
At dialogue time, with no image, z is the prior's mean (or K_T through the posterior).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gaussian import gaussian_kl_elements, gaussian_nll, reparameterize
from kernels.variational import variational_fusion
from mmtrain.models.iqformer import IQFormer
from mmtrain.models.packing import plan_rows
from mmtrain.schema import choices

INFERENCE_TEMPLATES = [
    "Describe what the following knowledge shows:",
    "Write a caption for this scene:",
    "Tell me what you see:",
]
RECONSTRUCTION_TEMPLATES = [
    "Imagine the scene described here:",
    "Picture this text:",
    "What would this look like?",
]


def pick(templates: Sequence[str], key: str, seed: int) -> str:
    """A template drawn at random, reproducibly per (seed, sample key)."""
    return random.Random(f"{seed}/template/{key}").choice(list(templates))


def noise(like: torch.Tensor, eps: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.randn_like(like) if eps is None else eps.to(like.device, like.dtype)


def sample_noise(keys: Sequence[str], shape: Sequence[int], seed: int, draw: int) -> torch.Tensor:
    """Standard normal noise per sample, a function of (seed, draw, sample key) alone: the same
    sample gets the same noise whichever rank or batch it lands in."""
    gens = [
        torch.Generator().manual_seed(random.Random(f"{seed}/eps/{draw}/{k}").getrandbits(63))
        for k in keys
    ]
    return torch.stack([torch.randn(*shape, generator=g) for g in gens])


@dataclass
class BVIFLosses:
    """How BVIF's KL and reconstruction terms are measured (`recipe.bvif` of vikdf_fuse)."""

    reduction: str = choices("per_dim", "sum", default="per_dim")  # over the W dimensions
    reconstruction: str = choices("mse", "gaussian", default="mse")  # mse: the released form
    prior_logvar_min: float = -2.0  # soft floor on the prior's log-variance (variance >= 0.135)
    free_bits: float = 0.0  # nats: each KL element at least this (0: off)


class BVIF(nn.Module):
    """Everything stage 2 trains: the IQ-Former, the soft-prompt projection, both Gaussian heads."""

    def __init__(
        self,
        iqformer: IQFormer,
        d_llm: int,
        variational: bool = True,
        losses: Optional[BVIFLosses] = None,
    ):
        super().__init__()
        w, q = iqformer.config.width, iqformer.config.num_queries
        self.iqformer = iqformer
        self.variational = variational
        self.losses = losses or BVIFLosses()
        self.to_llm = nn.Linear(w, d_llm)
        self.posterior = nn.Linear(w, 2 * w)  # residual mean and log-variance from K
        self.prior = nn.Linear(d_llm, 2 * w)  # mean and log-variance from the LLM's reading
        self.placeholders = nn.Parameter(torch.randn(q, d_llm) * 0.02)
        nn.init.zeros_(self.posterior.weight)
        with torch.no_grad():  # start with z ~= K and a small noise
            self.posterior.bias.zero_()
            self.posterior.bias[w:] = -4.0

    def posterior_stats(self, k: torch.Tensor):
        d_mu, logvar = self.posterior(k).chunk(2, dim=-1)
        return k + d_mu, logvar

    def prior_stats(self, states: torch.Tensor):
        mu, raw = self.prior(states).chunk(2, dim=-1)
        floor = self.losses.prior_logvar_min
        return mu, floor + F.softplus(raw - floor)  # ~raw above the floor, never below it

    def kl_per_dim(self, kl: torch.Tensor) -> torch.Tensor:
        """The KL `latent` returned, in nats per knowledge dimension (for logging)."""
        width = self.iqformer.config.width
        return (kl if self.losses.reduction == "per_dim" else kl / width).detach()

    def _per_dim(self, summed: torch.Tensor) -> torch.Tensor:
        """A term summed over the W dimensions, as `losses.reduction` asks."""
        return summed / self.iqformer.config.width if self.losses.reduction == "per_dim" else summed

    def latent(
        self,
        k: torch.Tensor,
        prior_states: Optional[torch.Tensor],
        sample: bool = True,
        eps: Optional[torch.Tensor] = None,
    ):
        """(z, kl or None, mu_p, logvar_p) for knowledge vectors k (B x Q x W); `eps` is the standard
        normal noise of the sample (drawn here when not given)."""
        if not self.variational:
            mu_p = self.prior_stats(prior_states)[0] if prior_states is not None else None
            return k, None, mu_p, None
        mu_q, lv_q = self.posterior_stats(k)
        eps = noise(mu_q, eps) if sample else torch.zeros_like(mu_q)
        if prior_states is None:
            return reparameterize(mu_q, lv_q, eps), None, None, None
        mu_p, lv_p = self.prior_stats(prior_states)
        z, kl = variational_fusion(mu_q, lv_q, mu_p, lv_p, eps=eps)
        if self.losses.free_bits > 0:  # elementwise (world-size invariant), in plain torch
            kl_el = gaussian_kl_elements(mu_q, lv_q, mu_p, lv_p)
            kl = kl_el.clamp(min=self.losses.free_bits).sum(-1).mean()
        return z, self._per_dim(kl), mu_p, lv_p

    def reconstruction_loss(
        self, k: torch.Tensor, mu_p: torch.Tensor, lv_p: Optional[torch.Tensor]
    ) -> torch.Tensor:
        target = k.detach().float()
        if lv_p is None or self.losses.reconstruction == "mse":  # the released form
            return F.mse_loss(mu_p.float(), target)
        return self._per_dim(gaussian_nll(target, mu_p, lv_p))


def _embedded(embed: nn.Module, segments: List[List[object]]):
    """Each sequence's embeddings (its token-id lists embedded, its tensors as they are, all
    concatenated) and the positions of its segments within it."""
    rows, spans = [], []
    for parts in segments:
        pieces, pos, cur = [], [], 0
        for p in parts:
            t = (
                p
                if isinstance(p, torch.Tensor)
                else embed(torch.tensor(p, dtype=torch.long, device=embed.weight.device))
            )
            pieces.append(t.to(embed.weight.dtype))
            pos.append((cur, cur + t.shape[0]))
            cur += t.shape[0]
        rows.append(torch.cat(pieces))
        spans.append(pos)
    return rows, spans


def _padding(embed: nn.Module, pad_id: int, rows: int, width: int) -> torch.Tensor:
    """A (rows, width, hidden) block of the pad token's embedding, to lay sequences into."""
    pad = embed(torch.tensor([pad_id], device=embed.weight.device))[0].to(embed.weight.dtype)
    return pad.expand(rows, width, -1).clone()


def embed_segments(
    embed: nn.Module, segments: List[List[object]], pad_id: int, left_pad: bool = False
):
    """Batch of sequences made of token-id lists and embedding tensors -> (inputs_embeds, attention mask,
    positions of each segment). Right-padded for training, left-padded for generation."""
    rows, spans = _embedded(embed, segments)
    n = max(r.shape[0] for r in rows)
    out = _padding(embed, pad_id, len(rows), n)
    mask = torch.zeros(len(rows), n, dtype=torch.long, device=out.device)
    for i, r in enumerate(rows):
        off = n - r.shape[0] if left_pad else 0
        out[i, off : off + r.shape[0]] = r
        mask[i, off : off + r.shape[0]] = 1
        spans[i] = [(a + off, b + off) for a, b in spans[i]]
    return out, mask, spans


def pack_segments(embed: nn.Module, segments: List[List[object]], pad_id: int, budget: int):
    """`embed_segments`, the sequences packed into rows of at most `budget` positions
    (`packing.plan_rows`) -> (inputs_embeds, sample_index: each position's sequence, -1 on
    padding, placed: each sequence's row and its segments' positions in that row)."""
    rows, spans = _embedded(embed, segments)
    lengths = [r.shape[0] for r in rows]  # shapes: no read of the device
    plan = plan_rows(lengths, budget)
    width = max(sum(lengths[i] for i in members) for members in plan)
    out = _padding(embed, pad_id, len(plan), width)
    index = torch.full((len(plan), width), -1, dtype=torch.long, device=out.device)
    placed = [None] * len(segments)
    for r, members in enumerate(plan):
        at = 0
        for i in members:
            out[r, at : at + lengths[i]] = rows[i]
            index[r, at : at + lengths[i]] = i
            placed[i] = (r, [(a + at, b + at) for a, b in spans[i]])
            at += lengths[i]
    return out, index, placed


def labels_for(placed, like: torch.Tensor, ids: List[List[int]], segment: int) -> torch.Tensor:
    """Labels for a causal LM, shaped as `like`: the token ids of each sequence's `segment` at
    their positions, -100 elsewhere. `placed`: each sequence's (row, positions of its segments),
    as `pack_segments` gives it, or `enumerate(spans)` of `embed_segments`."""
    labels = torch.full(like.shape, -100, dtype=torch.long, device=like.device)
    for i, (row, spans) in enumerate(placed):
        a, b = spans[segment]
        labels[row, a:b] = torch.tensor(ids[i], device=like.device)
    return labels
