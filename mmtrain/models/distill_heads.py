"""VIKDF stage-1 heads on top of the IQ-Former (methods.md, section 1).

- TIM: query 0 of K_I / K_T through linear maps to `tim_dim`, L2-normalised; the symmetric InfoNCE
  with a learnable temperature is `kernels.contrastive.ContrastiveLoss`.
- TA-MIM: masked image tokens attend to K_T in one block; CLS dropped, tokens back on
  the patch grid, a 1x1 conv to patch*patch*3 channels, pixel-shuffled to the image; L1 on the
  scored pixels / their count / 3.
- IA-MTM: masked text tokens attend to K_I in one block; a linear head to the vocabulary;
  cross-entropy on the selected positions ("mtm" their mean; "mtm_sum" and "mtm_count" for a mean
  over the selected positions of a whole global batch).

The block (`head_block`): "released", as the released code: the masked tokens attend to K and
nothing else (cross-attention, then a feed-forward layer, each post-norm), so a masked patch or
token can only be recovered from the knowledge; "decoder", a pre-norm transformer decoder layer
(self-attention among the tokens, then cross-attention to K, zero-initialised), whose masked
positions can also be solved from their unmasked neighbours.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from kernels.contrastive import ContrastiveLoss
from mmtrain.models.base import EntryPoints
from mmtrain.models.iqformer import IQFormer


class CrossBlock(nn.Module):
    """The released head block: cross-attention from the tokens to K, then a feed-forward layer,
    each with a residual and a post-norm (a BERT layer without its self-attention). Its
    cross-attention output starts at zero, as in the decoder block (see `_block`): with the
    released initialisation the demo's stage-1 R@1 fell from 0.050 to 0.010."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        self.norm1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x, knowledge, tgt_key_padding_mask=None):
        x = self.norm1(x + self.attn(x, knowledge, knowledge, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


def _block(width: int, heads: int, kind: str = "released") -> nn.Module:
    if kind == "released":
        return CrossBlock(width, heads)
    block = nn.TransformerDecoderLayer(
        width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
    )
    # Zero-initialised cross-attention output (a zero residual branch): at the start the
    # reconstruction heads neither read the knowledge vectors nor push on them. Otherwise their
    # gradients treat K's still-uninformative variation across samples as noise and flatten it
    # before TIM can shape it (seen with frozen towers whose features K barely varies with).
    nn.init.zeros_(block.multihead_attn.out_proj.weight)
    nn.init.zeros_(block.multihead_attn.out_proj.bias)
    return block


class Stage1Model(EntryPoints):
    entry_points = ("losses", "retrieval_embeddings")

    def __init__(
        self,
        iqformer: IQFormer,
        patch: int,
        grid: int,
        vocab: int,
        tim_dim: int = 256,
        heads: int = 8,
        init_scale: float = 1 / 0.07,
        tim_global: bool = True,
        head_block: str = "released",
    ):
        super().__init__()
        w = iqformer.config.width
        self.iqformer = iqformer
        self.patch = patch
        self.grid = grid
        self.tim_image = nn.Linear(w, tim_dim)
        self.tim_text = nn.Linear(w, tim_dim)
        self.tim = ContrastiveLoss(init_scale=init_scale, distributed=None if tim_global else False)
        cfg = iqformer.config
        # the heads read the masked tokens through their own projections
        self.mim_in = nn.Sequential(nn.Linear(cfg.vision_width, w), nn.LayerNorm(w))
        self.mtm_in = nn.Sequential(nn.Linear(cfg.text_width, w), nn.LayerNorm(w))
        self.mim_block = _block(w, heads, head_block)
        self.mim_out = nn.Conv2d(w, patch * patch * 3, 1)
        self.mtm_block = _block(w, heads, head_block)
        self.mtm_out = nn.Linear(w, vocab)

    def embed(self, image_states: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor):
        k_img = self.iqformer.read_image(image_states)
        k_txt = self.iqformer.read_text(text_states, text_mask)
        v = F.normalize(self.tim_image(k_img[:, 0]).float(), dim=-1)
        t = F.normalize(self.tim_text(k_txt[:, 0]).float(), dim=-1)
        return k_img, k_txt, v, t

    def reconstruct(self, masked_image_states: torch.Tensor, k_txt: torch.Tensor) -> torch.Tensor:
        x = self.mim_block(self.mim_in(masked_image_states.to(k_txt.dtype)), k_txt)
        x = x[:, -self.grid * self.grid :]  # drop CLS where there is one
        x = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        return F.pixel_shuffle(self.mim_out(x), self.patch)

    @torch.no_grad()
    def retrieval_embeddings(self, image_states, text_states, text_mask) -> Dict[str, torch.Tensor]:
        """The normalised image and text embeddings TIM compares (for retrieval evaluation)."""
        _, _, v, t = self.embed(image_states, text_states, text_mask)
        return {"image": v, "text": t}

    def losses(
        self,
        image_states,
        text_states,
        text_mask,
        masked_image_states=None,
        masked_text_states=None,
        pixels=None,
        scored=None,
        mtm_labels=None,
    ) -> Dict[str, torch.Tensor]:
        k_img, k_txt, v, t = self.embed(image_states, text_states, text_mask)
        tim = self.tim(v.to(k_img.dtype), t.to(k_img.dtype))
        recon = self.reconstruct(masked_image_states, k_txt)
        pix_mask = (
            scored.repeat_interleave(self.patch, 1)
            .repeat_interleave(self.patch, 2)[:, None]
            .float()
        )
        mim = ((recon.float() - pixels.float()).abs() * pix_mask).sum() / (
            pix_mask.sum() * 3
        ).clamp(min=1)
        h = self.mtm_block(
            self.mtm_in(masked_text_states.to(k_img.dtype)),
            k_img,
            tgt_key_padding_mask=text_mask == 0,
        )
        selected = mtm_labels != -100  # the vocabulary head only where a token is scored (~15%)
        mtm_sum = F.cross_entropy(
            self.mtm_out(h[selected]).float(), mtm_labels[selected], reduction="sum"
        )
        count = selected.sum()  # on the device: read at log steps only
        return {
            "tim": tim,
            "mim": mim,
            "mtm": mtm_sum / count.clamp(min=1),
            "mtm_sum": mtm_sum,
            "mtm_count": count,
            "recon": recon.detach(),
            "logit_scale": self.tim.log_scale.exp(),
        }
