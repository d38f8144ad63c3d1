"""VIKDF stage 2: BVIF fusion into a frozen LLM, then zero-resource dialogue fine-tuning.

`recipe.phase=fusion` trains on image-text shards, starting from a stage-1 export: contextual
inference (CE on the caption from soft prompts), knowledge reconstruction (Gaussian NLL of K
under the prior) and KL(q || p), each logged. `recipe.phase=dialogue` trains on dialogue shards:
the context gives knowledge (`recipe.knowledge`: prior = the LLM's own reading of the context,
the default and the zero-resource setting; text = text tower + IQ-Former; image = the pictured
scene when a dialogue has one; none = input-independent soft prompts, the no-knowledge
baseline), whose soft prompts sit right after the chat template's opening; CE on the response.
The LLM is any local HF causal-LM directory, frozen; with `recipe.lora.enabled` it carries a
peft LoRA adapter inside the DeepSpeed model, otherwise it is replicated outside it, like the
frozen towers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection, SampleDecoder, default_collate
from mmtrain.metrics.dialogue import dialogue_scores, perplexity, released_scores
from mmtrain.models.base import to_precision
from mmtrain.models.bvif import (
    BVIF,
    INFERENCE_TEMPLATES,
    RECONSTRUCTION_TEMPLATES,
    BVIFLosses,
    pick,
    sample_noise,
)
from mmtrain.models.encoders import FrozenTowers, load_tokenizer
from mmtrain.models.fuse import FuseModel, load_bvif_state
from mmtrain.models.generation import GenerationSection, pad_id
from mmtrain.models.iqformer import IQFormer
from mmtrain.models.lora import LoraSection, apply_lora
from mmtrain.parallelize import replicate_frozen, share_module
from mmtrain.recipes.base import EvalResult, GlobalMean, StepOutput
from mmtrain.recipes.common import ShardRecipe, gather_rows
from mmtrain.recipes.vikdf_distill import Collate as Stage1Collate
from mmtrain.recipes.vikdf_distill import Pixels, stage1_config_of, stage1_model
from mmtrain.schema import ConfigError, RecipeConfig, choices, path_field

SENTINEL = "\u2063KNOWLEDGE\u2063"


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


class Collate:
    """Token ids for every segment (templates drawn per sample key), pixels when there is an image."""

    def __init__(
        self,
        cfg: FuseConfig,
        tok,
        text_tok,
        seed: int,
        text_positions: Optional[int] = None,
        stage1=None,
    ):
        self.cfg = cfg
        self.stage1 = stage1  # stage 1's collate (masks, its tokenisation), with its losses
        self.tok = tok
        self.text_tok = text_tok
        # the text tower reads at most its positions (CLIP: 77), the LLM max_text_len tokens
        self.text_tower_len = min(cfg.max_text_len, text_positions or cfg.max_text_len)
        self.seed = seed
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        self.eos = [tok.eos_token_id]

    def ids(self, text: str, limit: Optional[int] = None) -> List[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids[:limit] if limit else ids

    def chat_split(self, context: List[str]):
        """(opening ids, ids after the knowledge slot) of the chat-templated user turn: the soft
        prompts go right after the template's opening, before the context."""
        msg = [{"role": "user", "content": SENTINEL + "\n".join(context)}]
        if self.tok.chat_template:
            text = self.tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
            head, _, tail = text.partition(SENTINEL)
            return self.ids(head), self.ids(tail)[-self.cfg.max_text_len * 2 :]
        head, _, tail = ("user: " + msg[0]["content"] + "\nassistant:").partition(SENTINEL)
        return self.bos + self.ids(head), self.ids(tail)[-self.cfg.max_text_len * 2 :]

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = default_collate(items)
        keys, c = batch["key"], self.cfg
        out: Dict[str, Any] = {"key": keys}
        if "image" in batch:
            out["pixels"] = batch["image"]
        recon = [self.bos + self.ids(pick(c.reconstruction_templates, k, self.seed)) for k in keys]
        if c.phase == "fusion":
            captions = batch.get("text") or [m["caption"] for m in batch["meta"]]
            out["text"] = [self.ids(t, c.max_text_len) for t in captions]
            if c.fusion_knowledge != "image":  # K_T: the text tower reads the caption
                out["text_ids"], out["text_attn"] = self.text_tower_ids(captions, "right")
            out["target"] = [t + self.eos for t in out["text"]]
            out["instr"] = [
                self.bos + self.ids(pick(c.inference_templates, k, self.seed)) for k in keys
            ]
            out["recon_instr"] = recon
            if self.stage1 is not None:
                # its masks and captions; the images are the batch's own, shipped once
                out["stage1"] = {k: v for k, v in self.stage1(items).items() if k != "pixels"}
            return out
        contexts = [m["context"] for m in batch["meta"]]
        split = [self.chat_split(ctx) for ctx in contexts]
        out["prefix"], out["middle"] = [s[0] for s in split], [s[1] for s in split]
        out["response"] = [m["response"] for m in batch["meta"]]
        # every reference of a response (`responses`, e.g. one per annotator), for the scores
        out["references"] = [m.get("responses") or [m["response"]] for m in batch["meta"]]
        out["target"] = [self.ids(r, c.max_text_len) + self.eos for r in out["response"]]
        # a long context keeps its most recent tokens wherever it is read: the prompt (`middle`),
        # the prior's reading and the text tower
        out["context"] = [self.ids("\n".join(ctx))[-c.max_text_len * 2 :] for ctx in contexts]
        out["context_text"] = ["\n".join(ctx) for ctx in contexts]
        out["recon_instr"] = recon
        if c.knowledge == "text":  # only the text tower reads these
            out["text_ids"], out["text_attn"] = self.text_tower_ids(out["context_text"], "left")
        return out

    def text_tower_ids(self, texts: List[str], cut: str):
        """The text tower's ids and mask; a long text loses its `cut` end ("left" for contexts:
        their most recent tokens stay)."""
        self.text_tok.truncation_side = cut
        enc = self.text_tok(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.text_tower_len,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]


class VIKDFFuse(ShardRecipe):
    Config = FuseConfig
    # the stage-1 run's recipe config, read in setup() with recipe.stage1_losses_in_fusion
    stage1: Optional[Any] = None

    def __init__(self, cfg: FuseConfig, ctx):
        super().__init__(cfg, ctx)
        self.steps_done = 0  # optimizer steps (for the KL warm-up), saved with the checkpoint

    def setup(self) -> None:
        c, ctx = self.cfg, self.ctx
        self.towers = to_precision(FrozenTowers(c.vision_path, c.text_path), ctx.device, ctx.dtype)
        self.tokenizer = load_tokenizer(c.llm_path)
        self.text_tokenizer = load_tokenizer(c.text_path)
        self.stage1 = stage1_config_of(Path(c.stage1)) if c.stage1_losses_in_fusion else None
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
        model = FuseModel(bvif, llm, pad_id(self.tokenizer), self.tokenizer.eos_token_id)
        if self.stage1 is not None:
            model.stage1 = self._stage1_heads(iq)
        return model if c.lora.enabled else replicate_frozen(model, "llm")

    def _stage1_heads(self, iq: IQFormer) -> nn.Module:
        """Stage 1's heads with their trained weights, around the IQ-Former BVIF trains (shared,
        registered once: under `bvif`)."""
        from safetensors.torch import load_file

        heads = stage1_model(self.stage1, iq, self.towers, len(self.text_tokenizer))
        heads.load_state_dict(load_file(str(Path(self.cfg.stage1) / "model.safetensors")))
        return share_module(heads, "iqformer")

    def pipeline(self):
        c = self.cfg
        if c.phase == "fusion":
            need_image = c.fusion_knowledge != "text" or self.stage1 is not None
        else:
            need_image = c.knowledge == "image"
        transform = self.transform if need_image else None
        stage1 = None
        if self.stage1 is not None:
            grid = self.towers.image_size // self.towers.patch_size
            patch = self.towers.patch_size
            stage1 = Stage1Collate(self.text_tokenizer, self.stage1, grid, patch, self.ctx.seed)
        collate = Collate(
            c,
            self.tokenizer,
            self.text_tokenizer,
            self.ctx.seed,
            self.towers.text_positions,
            stage1,
        )
        return SampleDecoder(transform, need_image), collate

    def _inputs(self, batch) -> Dict[str, Any]:
        """The frozen towers' states of the batch's pixels and (knowledge=text) context."""
        dev, t = self.ctx.device, self.towers
        if "pixels" in batch:
            batch["pixels"] = self.pixels(batch["pixels"])  # normalised, on the device
            batch["image_states"] = t.encode_image(batch["pixels"])
        if "text_ids" in batch:
            batch["text_mask"] = batch["text_attn"].to(dev, non_blocking=True)
            ids = batch["text_ids"].to(dev, non_blocking=True)
            batch["text_states"] = t.encode_text(ids, batch["text_mask"])
        return batch

    def _losses(self, model, batch, sample: bool = True) -> Dict[str, Any]:
        if self.cfg.phase == "fusion":
            return model("fusion_losses", batch, self.cfg.fusion_knowledge, sample=sample)
        return model("dialogue_losses", batch, knowledge=self.cfg.knowledge, sample=sample)

    def step(self, model, batch) -> StepOutput:
        batch = self._inputs(batch)
        if self.cfg.variational:  # noise per sample, the same at any world size
            batch["eps"] = sample_noise(batch["key"], self.noise_shape, self.ctx.seed, self.epoch)
        out = self._losses(model, batch)
        losses = {
            "ce": GlobalMean(out["ce_sum"], out["ce_count"]),
            **{k: v for k, v in out.items() if k in ("recon", "kl")},
        }
        if "stage1" in batch:
            losses.update(self._stage1_losses(model, batch))
        stats = {k: v.detach() for k, v in out.items() if k in ("kl_per_dim", "prior_logvar")}
        if "kl" in losses and self.cfg.kl_warmup_steps:
            stats["kl_weight"] = self.loss_weight("kl")
        tokens = sum(len(t) for t in batch["target"])
        return StepOutput(losses=losses, stats=stats, samples=len(batch["key"]), tokens=tokens)

    def _stage1_losses(self, model, batch) -> Dict[str, Any]:
        """TIM, TA-MIM and IA-MTM on the batch's images and captions, as stage 1 computes them."""
        dev, t, s1 = self.ctx.device, self.towers, batch["stage1"]
        attn = s1["attn"].to(dev, non_blocking=True)
        pixels = batch["pixels"]  # the same images, already normalised on the device
        out = model(
            "stage1_losses",
            image_states=batch["image_states"],
            text_states=t.encode_text(s1["ids"].to(dev, non_blocking=True), attn),
            text_mask=attn,
            masked_image_states=t.encode_image(self.pixels.masked(pixels, s1["zeroed"])),
            masked_text_states=t.encode_text(s1["masked_ids"].to(dev, non_blocking=True), attn),
            pixels=pixels,
            scored=s1["scored"].to(dev, non_blocking=True),
            mtm_labels=s1["labels"].to(dev, non_blocking=True),
        )
        mtm = GlobalMean(out["mtm_sum"], out["mtm_count"])
        return {"tim": out["tim"], "mim": out["mim"], "mtm": mtm}

    def loss_weight(self, name: str) -> float:
        """`loss_weights`, the KL's ramped up over `kl_warmup_steps` (annealing); stage 1's losses
        weighted as the stage-1 run weighted them unless `loss_weights` names them."""
        if self.stage1 is not None and name in ("tim", "mim", "mtm"):
            if name not in self.cfg.loss_weights:
                return float(self.stage1.loss_weights.get(name, 1.0))
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
        """Perplexity (and with `recipe.eval_generate`, the generation scores) during training."""
        if not self.cfg.data.val:
            return EvalResult()
        metrics = self._perplexity(model, split).metrics
        if self.cfg.eval_generate and self.cfg.phase == "dialogue":
            metrics.update(self._generate(model, split).metrics)
        return EvalResult(metrics)

    @torch.no_grad()
    def score(self, model, split: str) -> EvalResult:
        """`mmtrain eval`: perplexity, and for dialogues the generations and their scores; a row
        per sample with its target's NLL and tokens (and its generation)."""
        ppl = self._perplexity(model, split)
        if self.cfg.phase != "dialogue":
            return ppl
        generated = self._generate(model, split)
        nll = {r["key"]: r for r in ppl.rows}
        rows = [{**r, **nll[r["key"]]} for r in generated.rows]
        return EvalResult({**ppl.metrics, **generated.metrics}, rows=rows)

    def _perplexity(self, model, split: str) -> EvalResult:
        """Perplexity of the targets (teacher forcing, knowledge from the mean), every sample once."""
        loader = self.eval_loader(split)
        rows = []
        for raw in self.eval_batches(loader):
            batch = self._inputs(raw)
            nll = self._losses(model, batch, sample=False)["nll"].tolist()
            rows += [
                {"key": k, "nll": x, "tokens": len(t)}
                for k, x, t in zip(batch["key"], nll, batch["target"])
            ]
        rows = gather_rows(self.ctx, rows)
        nll, tokens = [r["nll"] for r in rows], [r["tokens"] for r in rows]
        ppl = perplexity(nll, tokens, released=self.cfg.metrics == "released")
        return EvalResult({"ppl": ppl, "nll": math.log(ppl), "n": len(rows)}, rows=rows)

    @torch.no_grad()
    def _generate(self, model, split: str) -> EvalResult:
        """Generate for every dialogue of the split (each rank its part), gather, score."""
        loader = self.eval_loader(split)
        # ranks stop generating at different lengths: synced, so that a LoRA LLM inside the
        # ZeRO-3 model runs the same forwards (and parameter gathers) on every rank
        gen = {**self.cfg.generation.kwargs(), "synced_gpus": self.ctx.world_size > 1}
        rows = []
        for raw in self.eval_batches(loader):
            batch = self._inputs(raw)
            tokens = model("generate", batch, knowledge=self.cfg.knowledge, **gen)
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            rows += [
                {
                    "key": k,
                    "context": c,
                    "reference": r[0],
                    "references": r,
                    "prediction": p.strip(),
                }
                for k, c, r, p in zip(
                    batch["key"], batch["context_text"], batch["references"], texts
                )
            ]
        rows = gather_rows(self.ctx, rows)
        scorer = released_scores if self.cfg.metrics == "released" else dialogue_scores
        scores = scorer([r["prediction"] for r in rows], [r["references"] for r in rows])
        return EvalResult({**scores, "n": len(rows)}, rows=rows)

    def export_modules(self, model) -> Dict[str, nn.Module]:
        out = {"iqformer": model.bvif.iqformer}
        if self.cfg.lora.enabled:
            out["llm"] = model.llm
        return out
