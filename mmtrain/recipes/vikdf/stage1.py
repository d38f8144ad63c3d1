"""VIKDF stage 1: distil implicit visual knowledge into the IQ-Former (TIM + TA-MIM + IA-MTM).

Frozen CLIP-style towers (local HF directories) encode the clean and the masked image and the
clean and the masked caption; the IQ-Former reads image and text tokens into knowledge vectors;
the heads of `mmtrain.models.distill_heads` turn them into the three losses (weights 0.5/0.2/0.2).
Masks are drawn in the data workers from (seed, sample key), so they survive a resume
(`collate.Stage1Collate`).
Evaluation: image->text and text->image recall@1/5/10 over the held-out shards, across all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection, SampleDecoder
from mmtrain.metrics.retrieval import match_ranks, recalls
from mmtrain.models.base import to_precision
from mmtrain.models.distill_heads import Stage1Model
from mmtrain.models.encoders import FrozenTowers, load_tokenizer
from mmtrain.models.iqformer import (
    BERT_SHAPE,
    IQFormer,
    IQFormerConfig,
    bert_shape_mismatch,
    init_from_bert,
)
from mmtrain.recipes.base import EvalResult, GlobalMean, StepOutput
from mmtrain.recipes.common import ShardRecipe, gather_rows
from mmtrain.recipes.vikdf.collate import Pixels, Stage1Batch, Stage1Collate
from mmtrain.schema import ConfigError, RecipeConfig, choices, path_field


@dataclass
class IQFormerSection:
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    num_queries: int = 32
    cross_attention_every: int = 2
    dropout: float = 0.1


@dataclass
class Stage1Config(RecipeConfig):
    name: str = "vikdf_distill"
    # CLIP/SigLIP directory (vision tower + preprocessor_config.json)
    vision_path: str = path_field("", required=True)
    # CLIP/SigLIP directory (text tower + tokenizer); often the same
    text_path: str = path_field("", required=True)
    bert_init: Optional[str] = path_field(None)  # BERT directory to initialise the IQ-Former from
    iqformer: IQFormerSection = field(default_factory=IQFormerSection)
    tim_dim: int = 256
    tim_global: bool = True  # negatives from the global batch (all ranks); false: local only
    init_scale: float = 14.285714  # 1 / 0.07
    head_heads: int = 8  # attention heads of the TA-MIM / IA-MTM blocks
    # released: the masked tokens attend to K only (post-norm); decoder: self-attention among
    # them too (pre-norm), which lets a masked position be solved from its neighbours
    head_block: str = choices("released", "decoder", default="released")
    mim_ratio: float = 0.6
    mim_block: int = 2  # mask blocks of mim_block x mim_block patches
    mim_visible: float = 0.2  # masked blocks left visible but still scored
    mtm_prob: float = 0.15
    mtm_replace: float = 0.8  # selected tokens replaced by the mask/end token; the rest kept
    max_text_len: int = 77
    image_log_every: int = 500  # TA-MIM reconstructions to TensorBoard every N micro-steps
    loss_weights: Dict[str, float] = field(
        default_factory=lambda: {"tim": 0.5, "mim": 0.2, "mtm": 0.2}
    )
    data: DataSection = field(default_factory=DataSection)

    def data_kind(self) -> str:
        return "image-text"

    def check(self) -> None:
        if self.bert_init:
            shape = {k: getattr(self.iqformer, k) for k in BERT_SHAPE}
            problem = bert_shape_mismatch(shape, self.bert_init)
            if problem:
                raise ConfigError(f"recipe.bert_init: {problem}, or drop recipe.bert_init")


def stage1_model(c: Stage1Config, iq: IQFormer, towers, vocab: int) -> Stage1Model:
    """The IQ-Former with stage 1's TIM, TA-MIM and IA-MTM heads, as `c` shapes them."""
    grid = towers.image_size // towers.patch_size
    return Stage1Model(
        iq,
        towers.patch_size,
        grid,
        vocab,
        c.tim_dim,
        c.head_heads,
        c.init_scale,
        c.tim_global,
        c.head_block,
    )


def stage1_config_of(export: Path) -> Stage1Config:
    """The recipe section of a stage-1 run, from its export's config.yaml (not re-validated:
    its data and model paths need not exist here)."""
    from omegaconf import OmegaConf

    path = export / "config.yaml"
    if not path.is_file() or not (export / "model.safetensors").is_file():
        raise ConfigError(
            f"recipe.stage1_losses_in_fusion needs the stage-1 run's `mmtrain export` in "
            f"recipe.stage1 (its config.yaml and model.safetensors hold the stage-1 heads); "
            f"{export} has no {path.name if not path.is_file() else 'model.safetensors'}"
        )
    raw = OmegaConf.load(path).recipe
    if raw.get("name") != "vikdf_distill":
        raise ConfigError(f"{path} is not a VIKDF stage-1 run (recipe {raw.get('name')!r})")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Stage1Config), raw))


class VIKDFDistill(ShardRecipe):
    Config = Stage1Config

    def setup(self) -> None:
        c, ctx = self.cfg, self.ctx
        self.towers = to_precision(FrozenTowers(c.vision_path, c.text_path), ctx.device, ctx.dtype)
        self.tokenizer = load_tokenizer(c.text_path)
        self.grid = self.towers.image_size // self.towers.patch_size
        self.transform = ImageTransform.from_pretrained(c.vision_path)
        self.pixels = Pixels(self.transform, self.towers.patch_size, ctx.device)
        self._calls = 0

    def build_model(self) -> torch.nn.Module:
        towers, c = self.towers, self.cfg
        iq = IQFormer(
            IQFormerConfig(
                width=c.iqformer.width,
                layers=c.iqformer.layers,
                heads=c.iqformer.heads,
                intermediate=c.iqformer.intermediate,
                num_queries=c.iqformer.num_queries,
                cross_attention_every=c.iqformer.cross_attention_every,
                vision_width=towers.vision_width,
                text_width=towers.text_width,
                dropout=c.iqformer.dropout,
            )
        )
        if c.bert_init:
            init_from_bert(iq, c.bert_init)
        return stage1_model(c, iq, towers, len(self.tokenizer))

    def pipeline(self):
        decode = SampleDecoder(self.transform, need_image=True)
        patch = self.towers.patch_size
        return decode, Stage1Collate(self.tokenizer, self.cfg, self.grid, patch, self.ctx.seed)

    def _encode(self, batch: Stage1Batch, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        t, dev = self.towers, self.ctx.device
        attn = batch.attn.to(dev, non_blocking=True)
        return {
            "image_states": t.encode_image(pixels),
            "text_states": t.encode_text(batch.ids.to(dev, non_blocking=True), attn),
            "text_mask": attn,
        }

    def step(self, model, batch: Stage1Batch) -> StepOutput:
        pixels = self.pixels(batch.pixels)
        masked = self.pixels.masked(pixels, batch.zeroed)
        feats = self._encode(batch, pixels)
        out = model("losses", **feats, **self.masked_views(batch, pixels, masked, feats))
        self._calls += 1
        images = {}
        if (
            self.ctx.rank == 0
            and self.cfg.image_log_every
            and self._calls % self.cfg.image_log_every == 0
        ):
            images["ta_mim"] = self._panel(pixels, masked, out["recon"])
        # TIM: the global-batch loss (kernels.contrastive); TA-MIM: a mean over equal-size samples;
        # IA-MTM: a mean over the selected tokens, which batches hold in varying numbers
        return StepOutput(
            losses={
                "tim": out["tim"],
                "mim": out["mim"],
                "mtm": GlobalMean(out["mtm_sum"], out["mtm_count"]),
            },
            stats={"logit_scale": out["logit_scale"].detach()},
            samples=len(batch.key),
            tokens=batch.attn.sum(),
            images=images,
        )

    def masked_views(self, batch: Stage1Batch, pixels, masked, feats) -> Dict[str, torch.Tensor]:
        """What TA-MIM and IA-MTM read beyond the clean views: the masked image's and the masked
        caption's states, the pixels to reconstruct, the scored patches, the masked tokens."""
        dev, t = self.ctx.device, self.towers
        return {
            "masked_image_states": t.encode_image(masked),
            "masked_text_states": t.encode_text(
                batch.masked_ids.to(dev, non_blocking=True), feats["text_mask"]
            ),
            "pixels": pixels,
            "scored": batch.scored.to(dev, non_blocking=True),
            "mtm_labels": batch.labels.to(dev, non_blocking=True),
        }

    def _panel(self, pixels, masked, recon) -> torch.Tensor:
        """original | masked input | reconstruction, for the first sample, in [0, 1]."""
        row = torch.cat([pixels[0], masked[0], recon[0].float()], dim=2).cpu()
        return ((row - row.min()) / (row.max() - row.min()).clamp(min=1e-6)).clamp(0, 1)

    @torch.no_grad()
    def evaluate(self, model, split: str = "val") -> EvalResult:
        """Recall@1/5/10 both ways over every pair of the split: each rank embeds its share, the
        pairs are gathered by key (a pair the loader repeated to even out the ranks counts once)."""
        if not self.cfg.data.val:
            return EvalResult()
        loader = self.eval_loader(split)
        rows = []
        for batch in self.eval_batches(loader):
            out = model("retrieval_embeddings", **self._encode(batch, self.pixels(batch.pixels)))
            pairs = zip(batch.key, out["image"].float().cpu(), out["text"].float().cpu())
            rows += [{"key": k, "image": i, "text": t} for k, i, t in pairs]
        rows = gather_rows(self.ctx, rows)
        i2t, t2i = match_ranks(
            torch.stack([r["image"] for r in rows]), torch.stack([r["text"] for r in rows])
        )
        # each pair's rank both ways (0: first): the figures can be recomputed from the rows
        ranked = [
            {"key": r["key"], "i2t_rank": a, "t2i_rank": b} for r, a, b in zip(rows, i2t, t2i)
        ]
        return EvalResult(recalls(i2t, t2i), rows=ranked)

    def flops_per_sample(self) -> float:
        """Approximate training FLOPs per sample: frozen forwards (2 images, 2 captions) at 2 FLOPs per
        parameter per token, trainable parts at 6 (forward + backward), attention scores ignored."""
        t, c = self.towers, self.cfg
        n_img = self.grid * self.grid + 1
        pv = sum(p.numel() for p in t.vision.parameters())
        pt = sum(p.numel() for p in t.text.parameters())
        w, q = c.iqformer.width, c.iqformer.num_queries
        layer = 12 * w * w
        qformer = c.iqformer.layers * layer * q + (
            c.iqformer.layers // c.iqformer.cross_attention_every
        ) * 2 * w * w * (n_img + c.max_text_len)
        heads = 12 * w * w * (n_img + c.max_text_len) + w * len(self.tokenizer) * c.max_text_len
        return 2 * 2 * (pv * n_img + pt * c.max_text_len) + 6 * (2 * qformer + heads)

    def export_modules(self, model) -> Dict[str, torch.nn.Module]:
        return {"iqformer": model.iqformer}
