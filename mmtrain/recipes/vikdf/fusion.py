"""VIKDF stage 2, `recipe.phase=fusion`: BVIF fuses the IQ-Former's knowledge into a frozen LLM.

Image-text shards, starting from a stage-1 export: contextual inference (CE on the caption from
soft prompts), knowledge reconstruction (Gaussian NLL of K under the prior) and KL(q || p), each
logged. The knowledge fused is K_T (the caption through the text tower and the IQ-Former, as
released), K_I or both (`recipe.fusion_knowledge`); with `recipe.stage1_losses_in_fusion` stage
1's TIM, TA-MIM and IA-MTM train on the same batches, as the released code trains all five.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from mmtrain.data.reader import SampleDecoder
from mmtrain.models.fuse import FuseModel, Knowledge
from mmtrain.models.iqformer import IQFormer
from mmtrain.parallelize import share_module
from mmtrain.recipes.base import GlobalMean
from mmtrain.recipes.vikdf.collate import FusionBatch, FusionCollate, Stage1Collate
from mmtrain.recipes.vikdf.fuse import VIKDFFuse
from mmtrain.recipes.vikdf.stage1 import Stage1Config, stage1_config_of, stage1_model


class VIKDFFusion(VIKDFFuse, phase="fusion"):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        # the stage-1 run's recipe config, read in setup() with recipe.stage1_losses_in_fusion
        self.stage1: Optional[Stage1Config] = None

    def setup(self) -> None:
        super().setup()
        c = self.cfg
        self.stage1 = stage1_config_of(Path(c.stage1)) if c.stage1_losses_in_fusion else None

    def extend(self, model: FuseModel) -> FuseModel:
        """Stage 1's heads with their trained weights, around the IQ-Former BVIF trains (shared,
        registered once: under `bvif`), when its losses are kept."""
        if self.stage1 is None:
            return model
        from safetensors.torch import load_file

        iq: IQFormer = model.bvif.iqformer
        heads = stage1_model(self.stage1, iq, self.towers, len(self.text_tokenizer))
        heads.load_state_dict(load_file(str(Path(self.cfg.stage1) / "model.safetensors")))
        model.stage1 = share_module(heads, "iqformer")
        return model

    def pipeline(self):
        c, t = self.cfg, self.towers
        need_image = c.fusion_knowledge != "text" or self.stage1 is not None
        stage1 = None
        if self.stage1 is not None:
            grid = t.image_size // t.patch_size
            stage1 = Stage1Collate(
                self.text_tokenizer, self.stage1, grid, t.patch_size, self.ctx.seed
            )
        collate = FusionCollate(
            c, self.tokenizer, self.text_tokenizer, self.ctx.seed, t.text_positions, stage1
        )
        return SampleDecoder(self.transform if need_image else None, need_image), collate

    def losses(self, model, batch: FusionBatch, seen: Knowledge, sample: bool) -> Dict[str, Any]:
        return model(
            "fusion_losses",
            seen,
            batch.text,
            batch.instr,
            batch.target,
            batch.recon_instr,
            self.cfg.fusion_knowledge,
            sample=sample,
        )

    def more_losses(self, model, batch: FusionBatch, seen: Knowledge, pixels) -> Dict[str, Any]:
        """TIM, TA-MIM and IA-MTM on the batch's images and captions, as stage 1 computes them."""
        if batch.stage1 is None:
            return {}
        dev, t, s1 = self.ctx.device, self.towers, batch.stage1
        attn = s1.attn.to(dev, non_blocking=True)
        out = model(
            "stage1_losses",
            image_states=seen.image_states,
            text_states=t.encode_text(s1.ids.to(dev, non_blocking=True), attn),
            text_mask=attn,
            masked_image_states=t.encode_image(self.pixels.masked(pixels, s1.zeroed)),
            masked_text_states=t.encode_text(s1.masked_ids.to(dev, non_blocking=True), attn),
            pixels=pixels,  # the same images, already normalised on the device
            scored=s1.scored.to(dev, non_blocking=True),
            mtm_labels=s1.labels.to(dev, non_blocking=True),
        )
        mtm = GlobalMean(out["mtm_sum"], out["mtm_count"])
        return {"tim": out["tim"], "mim": out["mim"], "mtm": mtm}

    def loss_weight(self, name: str) -> float:
        """Stage 1's losses weighted as the stage-1 run weighted them unless `loss_weights` names
        them; the rest as every phase weighs them."""
        if self.stage1 is not None and name in ("tim", "mim", "mtm"):
            if name not in self.cfg.loss_weights:
                return float(self.stage1.loss_weights.get(name, 1.0))
        return super().loss_weight(name)
