"""VIKDF stage 2's shared layer: the config (`recipe.name=vikdf_fuse`), the model (BVIF around a
frozen LLM), and what fusion and dialogue both do; `recipe.phase` picks the recipe once
(`VIKDFFuse`: fusion.py or dialogue.py).

The LLM is any local HF causal-LM directory, frozen; with `recipe.lora.enabled` it carries a
peft LoRA adapter inside the DeepSpeed model, otherwise it is replicated outside it, like the
frozen towers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection
from mmtrain.metrics.dialogue import perplexity
from mmtrain.models.base import to_precision
from mmtrain.models.bvif import (
    BVIF,
    INFERENCE_TEMPLATES,
    RECONSTRUCTION_TEMPLATES,
    BVIFLosses,
    sample_noise,
)
from mmtrain.models.encoders import FrozenTowers, load_tokenizer
from mmtrain.models.fuse import FuseModel, Knowledge, load_bvif_state
from mmtrain.models.generation import GenerationSection, pad_id
from mmtrain.models.iqformer import IQFormer
from mmtrain.models.lora import LoraSection, apply_lora
from mmtrain.parallelize import replicate_frozen
from mmtrain.recipes.base import EvalResult, GlobalMean, StepOutput
from mmtrain.recipes.common import ShardRecipe, gather_rows
from mmtrain.recipes.vikdf.collate import DialogueBatch, FusionBatch, Pixels
from mmtrain.schema import ConfigError, RecipeConfig, bounded, choices, path_field


@dataclass
class FuseConfig(RecipeConfig):
    name: str = "vikdf_fuse"
    phase: str = choices("fusion", "dialogue", default="fusion")
    llm_path: str = path_field("", required=True)  # local HF causal LM (e.g. Llama-2-7b-chat)
    # stage-1 export (holds iqformer/) or an iqformer dir
    stage1: str = path_field("", required=True)
    vision_path: str = path_field("", required=True)  # the stage-1 towers
    text_path: str = path_field("", required=True)
    init_from: Optional[str] = path_field(None)  # a fusion run's export, to start dialogue from
    variational: bool = True  # false: the released CE + MSE form, no latent
    bvif: BVIFLosses = field(default_factory=BVIFLosses)  # scales of the KL and reconstruction
    kl_warmup_steps: int = 0  # the KL weight rises linearly from 0 over these optimizer steps
    knowledge: str = choices("prior", "text", "image", "none", default="prior")  # dialogue phase
    # fusion phase: the knowledge fused: K_T (the caption through the text tower and the IQ-Former,
    # as released), K_I (the image's), or both (each term the mean of the two)
    fusion_knowledge: str = choices("text", "image", "both", default="text")
    # keep the stage-1 IQ-Former as it is (its K_I and K_T stay what stage 1 aligned); by default
    # it trains on with the stage-2 losses alone and may drift from that alignment
    freeze_iqformer: bool = False
    # fusion phase: also train stage 1's TIM, TA-MIM and IA-MTM (heads, masking and weights from
    # the stage-1 export in `stage1`) on the same image-text batches, as the released code trains
    # all five losses together, so K_I and K_T stay aligned while BVIF trains
    stage1_losses_in_fusion: bool = False
    inference_templates: List[str] = field(default_factory=lambda: list(INFERENCE_TEMPLATES))
    reconstruction_templates: List[str] = field(
        default_factory=lambda: list(RECONSTRUCTION_TEMPLATES)
    )
    max_text_len: int = 64
    # > 0: each micro-batch's LLM sequences packed into rows of at most this many positions (a
    # longer one alone in its row), attention kept within each sequence; 0: padded to the longest
    pack_tokens: int = bounded(0, ge=0)
    lora: LoraSection = field(default_factory=LoraSection)
    generation: GenerationSection = field(
        default_factory=lambda: GenerationSection(
            max_new_tokens=32, num_beams=3, no_repeat_ngram_size=3
        )
    )
    eval_generate: bool = False  # also generate + score during training evals
    # dialogue metric definitions: mmtrain's, or the VIKDF authors' released eval (metrics/dialogue.py)
    metrics: str = choices("mmtrain", "released", default="mmtrain")
    loss_weights: Dict[str, float] = field(
        default_factory=lambda: {"ce": 1.0, "recon": 0.5, "kl": 0.1}
    )
    data: DataSection = field(default_factory=DataSection)

    def data_kind(self) -> str:
        return "image-text" if self.phase == "fusion" else "dialogue"

    def check(self) -> None:
        if self.stage1_losses_in_fusion and self.phase != "fusion":
            raise ConfigError("recipe.stage1_losses_in_fusion applies to recipe.phase=fusion only")
        if self.stage1_losses_in_fusion and self.freeze_iqformer:
            raise ConfigError(
                "recipe.stage1_losses_in_fusion trains the IQ-Former; recipe.freeze_iqformer "
                "keeps it fixed: choose one"
            )


Stage2Batch = Union[FusionBatch, DialogueBatch]


class VIKDFFuse(ShardRecipe):
    """`recipe.name=vikdf_fuse`: constructing it gives the phase's recipe (`VIKDFFusion` or
    `VIKDFDialogue`, both subclasses), chosen once from `recipe.phase`."""

    Config = FuseConfig
    phases: Dict[str, type] = {}  # phase -> recipe class (fusion.py and dialogue.py add theirs)

    def __new__(cls, cfg: FuseConfig = None, ctx=None):
        if cls is VIKDFFuse and cfg is not None:
            cls = VIKDFFuse.phases[cfg.phase]
        return super().__new__(cls)

    def __init_subclass__(cls, phase: Optional[str] = None, **kw):
        super().__init_subclass__(**kw)
        if phase:
            VIKDFFuse.phases[phase] = cls

    def __init__(self, cfg: FuseConfig, ctx):
        super().__init__(cfg, ctx)
        self.steps_done = 0  # optimizer steps (for the KL warm-up), saved with the checkpoint

    def setup(self) -> None:
        c, ctx = self.cfg, self.ctx
        self.towers = to_precision(FrozenTowers(c.vision_path, c.text_path), ctx.device, ctx.dtype)
        self.tokenizer = load_tokenizer(c.llm_path)
        self.text_tokenizer = load_tokenizer(c.text_path)
        self.transform = ImageTransform.from_pretrained(c.vision_path)
        self.pixels = Pixels(self.transform, self.towers.patch_size, ctx.device)

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        c, ctx = self.cfg, self.ctx
        stage1 = Path(c.stage1)
        iq = IQFormer.from_pretrained(
            str(stage1 / "iqformer" if (stage1 / "iqformer").is_dir() else stage1)
        )
        if c.lora.enabled:  # trained through its adapters: partitioned as it loads under ZeRO-3
            with ctx.partitioned():
                llm = AutoModelForCausalLM.from_pretrained(c.llm_path).requires_grad_(False)
                llm = apply_lora(llm, c.lora)
        else:  # frozen and whole on every rank (replicate_frozen below)
            llm = AutoModelForCausalLM.from_pretrained(c.llm_path).requires_grad_(False)
            llm = to_precision(llm, ctx.device, ctx.dtype).eval()
        if c.freeze_iqformer:
            iq.requires_grad_(False)
        bvif = BVIF(iq, llm.config.hidden_size, c.variational, c.bvif)
        self.noise_shape = (iq.config.num_queries, iq.config.width)  # of z, per sample
        if c.init_from:
            load_bvif_state(bvif, c.init_from)
        model = self.extend(
            FuseModel(bvif, llm, pad_id(self.tokenizer), self.tokenizer.eos_token_id, c.pack_tokens)
        )
        return model if c.lora.enabled else replicate_frozen(model, "llm")

    def extend(self, model: FuseModel) -> FuseModel:
        """What a phase adds to the model before it is wrapped (fusion: stage 1's heads)."""
        return model

    def seen(
        self, batch: Stage2Batch, pixels: Optional[torch.Tensor] = None, noise: bool = False
    ) -> Knowledge:
        """The frozen towers' states of the batch's images (`pixels`: already normalised on the
        device, else made from the batch's) and texts; with `noise` (a variational training
        step) the latent's noise per sample, the same at any world size."""
        dev, t = self.ctx.device, self.towers
        seen = Knowledge()
        if batch.pixels is not None:
            pixels = self.pixels(batch.pixels) if pixels is None else pixels
            seen.image_states = t.encode_image(pixels)
        if batch.text_ids is not None:
            seen.text_mask = batch.text_attn.to(dev, non_blocking=True)
            ids = batch.text_ids.to(dev, non_blocking=True)
            seen.text_states = t.encode_text(ids, seen.text_mask)
        if noise and self.cfg.variational:
            seen.eps = sample_noise(batch.key, self.noise_shape, self.ctx.seed, self.epoch)
        return seen

    def losses(self, model, batch: Stage2Batch, seen: Knowledge, sample: bool) -> Dict[str, Any]:
        """The phase's terms (a model entry point); `sample=False`: the latent's mean."""
        raise NotImplementedError

    def more_losses(self, model, batch: Stage2Batch, seen: Knowledge, pixels) -> Dict[str, Any]:
        """Losses a phase adds on the same batch (fusion: stage 1's, when kept)."""
        return {}

    def step(self, model, batch: Stage2Batch) -> StepOutput:
        pixels = self.pixels(batch.pixels) if batch.pixels is not None else None
        seen = self.seen(batch, pixels, noise=True)
        out = self.losses(model, batch, seen, sample=True)
        losses = {
            "ce": GlobalMean(out["ce_sum"], out["ce_count"]),
            **{k: v for k, v in out.items() if k in ("recon", "kl")},
            **self.more_losses(model, batch, seen, pixels),
        }
        stats = {k: v.detach() for k, v in out.items() if k in ("kl_per_dim", "prior_logvar")}
        if "kl" in losses and self.cfg.kl_warmup_steps:
            stats["kl_weight"] = self.loss_weight("kl")
        tokens = sum(len(t) for t in batch.target)
        return StepOutput(losses=losses, stats=stats, samples=len(batch.key), tokens=tokens)

    def loss_weight(self, name: str) -> float:
        """`loss_weights`, the KL's ramped up over `kl_warmup_steps` (annealing)."""
        weight = super().loss_weight(name)
        warmup = self.cfg.kl_warmup_steps
        return weight * min(1.0, self.steps_done / warmup) if name == "kl" and warmup else weight

    def on_step_end(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.steps_done = int(state.get("steps_done", 0))

    @torch.no_grad()
    def evaluate(self, model, split: str = "val") -> EvalResult:
        """Perplexity during training."""
        if not self.cfg.data.val:
            return EvalResult()
        return EvalResult(self.perplexity(model, split).metrics)

    @torch.no_grad()
    def score(self, model, split: str) -> EvalResult:
        """`mmtrain eval`: perplexity, a row per sample with its target's NLL and tokens."""
        return self.perplexity(model, split)

    def perplexity(self, model, split: str) -> EvalResult:
        """Perplexity of the targets (teacher forcing, knowledge from the mean), every sample once."""
        loader = self.eval_loader(split)
        rows = []
        for batch in self.eval_batches(loader):
            nll = self.losses(model, batch, self.seen(batch), sample=False)["nll"].tolist()
            rows += [
                {"key": k, "nll": x, "tokens": len(t)}
                for k, x, t in zip(batch.key, nll, batch.target)
            ]
        rows = gather_rows(self.ctx, rows)
        nll, tokens = [r["nll"] for r in rows], [r["tokens"] for r in rows]
        ppl = perplexity(nll, tokens, released=self.cfg.metrics == "released")
        return EvalResult({"ppl": ppl, "nll": math.log(ppl), "n": len(rows)}, rows=rows)

    def export_modules(self, model) -> Dict[str, nn.Module]:
        out = {"iqformer": model.bvif.iqformer}
        if self.cfg.lora.enabled:
            out["llm"] = model.llm
        return out
