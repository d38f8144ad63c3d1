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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mmtrain.config import LoraSection, RecipeConfig, choices, path_field
from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection, SampleDecoder, default_collate, split_spec
from mmtrain.models.bvif import (
    BVIF,
    INFERENCE_TEMPLATES,
    RECONSTRUCTION_TEMPLATES,
    embed_segments,
    labels_for,
    noise,
    pick,
    sample_noise,
)
from mmtrain.models.encoders import FrozenTowers, load_tokenizer
from mmtrain.models.iqformer import IQFormer
from mmtrain.recipes.base import GlobalMean, Recipe, StepOutput

SENTINEL = "\u2063KNOWLEDGE\u2063"


@dataclass
class GenerationSection:
    num_beams: int = 3
    no_repeat_ngram_size: int = 3
    max_new_tokens: int = 32


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
    knowledge: str = choices("prior", "text", "image", "none", default="prior")  # dialogue phase
    inference_templates: List[str] = field(default_factory=lambda: list(INFERENCE_TEMPLATES))
    reconstruction_templates: List[str] = field(
        default_factory=lambda: list(RECONSTRUCTION_TEMPLATES)
    )
    max_text_len: int = 64
    lora: LoraSection = field(default_factory=LoraSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    eval_generate: bool = False  # also generate + score during training evals
    loss_weights: Dict[str, float] = field(
        default_factory=lambda: {"ce": 1.0, "recon": 0.5, "kl": 0.1}
    )
    data: DataSection = field(default_factory=DataSection)

    def data_kind(self) -> str:
        return "image-text" if self.phase == "fusion" else "dialogue"


class FuseModel(nn.Module):
    """The trainable BVIF parts (+ the LLM when LoRA trains it); a frozen LLM is attached unregistered."""

    def __init__(self, bvif: BVIF, llm: nn.Module, llm_trains: bool):
        super().__init__()
        self.bvif = bvif
        if llm_trains:
            self.llm = llm
        else:
            object.__setattr__(self, "llm", llm)  # not a submodule: ZeRO-3 never shards it

    def _embed(self):
        return self.llm.get_input_embeddings()

    def _prior_states(self, instr: List[List[int]], text: List[List[int]]) -> torch.Tensor:
        ph = self.bvif.placeholders
        embeds, mask, spans = embed_segments(
            self._embed(), [[a, b, ph] for a, b in zip(instr, text)], self.pad_id
        )
        h = self.llm(
            inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-1]
        return torch.stack([h[i, s[2][0] : s[2][1]] for i, s in enumerate(spans)])

    def _lm_loss(
        self, parts: List[List[Any]], target_segment: int, targets: List[List[int]]
    ) -> Dict[str, Any]:
        """Cross-entropy of the target segment: summed ("ce_sum") over its "ce_count" tokens, their
        mean ("ce"), and each sample's summed NLL ("nll", detached)."""
        embeds, mask, spans = embed_segments(self._embed(), parts, self.pad_id)
        labels = labels_for(spans, mask, targets, target_segment)[:, 1:]
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
        tok = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        count = int((labels != -100).sum())
        return {
            "ce": tok.sum() / max(1, count),
            "ce_sum": tok.sum(),
            "ce_count": count,
            "nll": tok.sum(1).detach(),
        }

    def soft_prompts(
        self,
        knowledge: str,
        k: Optional[torch.Tensor],
        prior_states: Optional[torch.Tensor],
        sample: bool,
        batch_size: int,
        eps: Optional[torch.Tensor] = None,
    ):
        b = self.bvif
        if knowledge == "none":  # input-independent soft prompts (no knowledge)
            return b.to_llm(b.iqformer.queries[0]).expand(batch_size, -1, -1)
        if knowledge == "prior":
            mu_p, lv_p = b.prior_stats(prior_states)
            z = (
                mu_p + torch.exp(0.5 * lv_p.clamp(-30, 20)) * noise(mu_p, eps)
                if (sample and b.variational)
                else mu_p
            )
            return b.to_llm(z)
        z = b.latent(k, None, sample=sample, eps=eps)[0]
        return b.to_llm(z)

    def forward(
        self,
        batch: Dict[str, Any],
        phase: str,
        knowledge: str = "image",
        sample: bool = True,
        generate: Optional[dict] = None,
    ) -> Dict[str, torch.Tensor]:
        b = self.bvif
        if phase == "fusion":
            k = b.iqformer.read_image(batch["image_states"])
            prior_states = self._prior_states(batch["recon_instr"], batch["text"])
            z, kl, mu_p, lv_p = b.latent(k, prior_states, sample=sample, eps=batch.get("eps"))
            soft = b.to_llm(z)
            out = self._lm_loss(
                [[i, s, t] for i, s, t in zip(batch["instr"], soft, batch["target"])],
                2,
                batch["target"],
            )
            out["recon"] = b.reconstruction_loss(k, mu_p, lv_p)
            if kl is not None:
                out["kl"] = kl
            return out
        k, prior_states = None, None
        if knowledge == "image":
            k = b.iqformer.read_image(batch["image_states"])
        elif knowledge == "text":
            k = b.iqformer.read_text(batch["text_states"], batch["text_mask"])
        elif knowledge == "prior":
            prior_states = self._prior_states(batch["recon_instr"], batch["context"])
        soft = self.soft_prompts(
            knowledge, k, prior_states, sample, len(batch["key"]), batch.get("eps")
        )
        if generate is not None:
            embeds, mask, _ = embed_segments(
                self._embed(),
                [[p, s, m] for p, s, m in zip(batch["prefix"], soft, batch["middle"])],
                self.pad_id,
                left_pad=True,
            )
            return {
                "tokens": self.llm.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_id,
                    **generate,
                )
            }
        return self._lm_loss(
            [
                [p, s, m, r]
                for p, s, m, r in zip(batch["prefix"], soft, batch["middle"], batch["target"])
            ],
            3,
            batch["target"],
        )


class Collate:
    """Token ids for every segment (templates drawn per sample key), pixels when there is an image."""

    def __init__(self, cfg: FuseConfig, tok, text_tok, seed: int):
        self.cfg, self.tok, self.text_tok, self.seed = cfg, tok, text_tok, seed
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
            out["target"] = [t + self.eos for t in out["text"]]
            out["instr"] = [
                self.bos + self.ids(pick(c.inference_templates, k, self.seed)) for k in keys
            ]
            out["recon_instr"] = recon
            return out
        contexts = [m["context"] for m in batch["meta"]]
        split = [self.chat_split(ctx) for ctx in contexts]
        out["prefix"], out["middle"] = [s[0] for s in split], [s[1] for s in split]
        out["response"] = [m["response"] for m in batch["meta"]]
        out["target"] = [self.ids(r, c.max_text_len) + self.eos for r in out["response"]]
        out["context"] = [self.ids("\n".join(ctx), c.max_text_len * 2) for ctx in contexts]
        out["context_text"] = ["\n".join(ctx) for ctx in contexts]
        out["recon_instr"] = recon
        if c.knowledge == "text":  # only the text tower reads these
            enc = self.text_tok(
                out["context_text"],
                padding="max_length",
                truncation=True,
                max_length=c.max_text_len,
                return_tensors="pt",
            )
            out["text_ids"], out["text_attn"] = enc["input_ids"], enc["attention_mask"]
        return out


class VIKDFFuse(Recipe):
    Config = FuseConfig

    def _setup(self):
        if hasattr(self, "towers"):
            return
        c, ctx = self.cfg, self.ctx
        self.towers = FrozenTowers(c.vision_path, c.text_path).to(ctx.device, ctx.dtype)
        self.tokenizer, self.text_tokenizer = (
            load_tokenizer(c.llm_path),
            load_tokenizer(c.text_path),
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        self._setup()
        c = self.cfg
        iq_dir = (
            Path(c.stage1) / "iqformer"
            if (Path(c.stage1) / "iqformer").is_dir()
            else Path(c.stage1)
        )
        iq = IQFormer.from_pretrained(str(iq_dir))
        llm = AutoModelForCausalLM.from_pretrained(c.llm_path).requires_grad_(False)
        if c.lora.enabled:
            from peft import LoraConfig, get_peft_model

            llm = get_peft_model(
                llm,
                LoraConfig(
                    r=c.lora.r,
                    lora_alpha=c.lora.alpha,
                    lora_dropout=c.lora.dropout,
                    target_modules=list(c.lora.target_modules),
                ),
            )
        else:
            llm = llm.to(self.ctx.device, self.ctx.dtype).eval()
        bvif = BVIF(iq, llm.config.hidden_size, c.variational)
        self.noise_shape = (iq.config.num_queries, iq.config.width)  # of z, per sample
        if c.init_from:
            from safetensors.torch import load_file

            state = load_file(str(Path(c.init_from) / "model.safetensors"))
            bvif.load_state_dict(
                {k[len("bvif.") :]: v for k, v in state.items() if k.startswith("bvif.")}
            )
        model = FuseModel(bvif, llm, c.lora.enabled)
        model.pad_id, model.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        return model

    def _loader(self, spec: str, section: DataSection):
        self._setup()
        c, ctx = self.cfg, self.ctx
        need_image = c.phase == "fusion" or c.knowledge == "image"
        decode = SampleDecoder(
            ImageTransform.from_pretrained(c.vision_path) if need_image else None, need_image
        )
        return self.loader(
            section, spec, decode, Collate(c, self.tokenizer, self.text_tokenizer, ctx.seed)
        )

    def build_data(self):
        self.train_data = self._loader(self.cfg.data.train, self.cfg.data)
        return self.train_data

    def _inputs(self, batch) -> Dict[str, Any]:
        dev, t = self.ctx.device, self.towers
        if "pixels" in batch:
            batch["image_states"] = t.encode_image(batch["pixels"].to(dev))
        if "text_ids" in batch:
            batch["text_mask"] = batch["text_attn"].to(dev)
            batch["text_states"] = t.encode_text(batch["text_ids"].to(dev), batch["text_mask"])
        return batch

    def step(self, model, batch) -> StepOutput:
        batch = self._inputs(batch)
        if self.cfg.variational:  # noise per sample, the same at any world size
            batch["eps"] = sample_noise(
                batch["key"], self.noise_shape, self.ctx.seed, self.train_data.epoch
            )
        out = model(batch, phase=self.cfg.phase, knowledge=self.cfg.knowledge)
        losses = {
            "ce": GlobalMean(out["ce_sum"], out["ce_count"]),
            **{k: v for k, v in out.items() if k in ("recon", "kl")},
        }
        return StepOutput(
            losses=losses, samples=len(batch["key"]), tokens=sum(len(t) for t in batch["target"])
        )

    def _val_loader(self, split: str):
        spec = split_spec(self.cfg.data.val, split)
        return self._loader(
            spec, DataSection(**{**vars(self.cfg.data), "mode": "eval", "shuffle_buffer": 1})
        )

    @torch.no_grad()
    def evaluate(self, model, split: str = "val") -> Dict[str, float]:
        """Perplexity (and with `recipe.eval_generate`, the generation scores) during training."""
        if not self.cfg.data.val:
            return {}
        metrics = self._perplexity(model, split)
        if self.cfg.eval_generate and self.cfg.phase == "dialogue":
            metrics.update(self._generate(model, split)[0])
        return metrics

    @torch.no_grad()
    def score(self, model, split: str):
        """`mmtrain eval`: perplexity, and for dialogues the generations, their scores and rows."""
        metrics = self._perplexity(model, split)
        if self.cfg.phase != "dialogue":
            return metrics, []
        scores, rows = self._generate(model, split)
        return {**metrics, **scores}, rows

    def _perplexity(self, model, split: str) -> Dict[str, float]:
        """Perplexity of the targets (teacher forcing, knowledge from the mean), every sample once."""
        loader = self._val_loader(split)
        per_key = {}
        for _ in range(loader.steps_per_epoch):
            batch = self._inputs(next(loader))
            out = model(batch, phase=self.cfg.phase, knowledge=self.cfg.knowledge, sample=False)
            for key, nll, target in zip(batch["key"], out["nll"].tolist(), batch["target"]):
                per_key[key] = (nll, len(target))
        merged = {k: v for part in self.ctx.gather_objects(per_key) for k, v in part.items()}
        total_nll, tokens = sum(v[0] for v in merged.values()), sum(v[1] for v in merged.values())
        return {
            "ppl": float(torch.exp(torch.tensor(total_nll / tokens))),
            "nll": total_nll / tokens,
            "n": len(merged),
        }

    @torch.no_grad()
    def _generate(self, model, split: str):
        """Generate for every dialogue of the split (each rank its part), gather, score."""
        from mmtrain.metrics.dialogue import dialogue_scores

        loader = self._val_loader(split)
        g = self.cfg.generation
        gen = {
            "num_beams": g.num_beams,
            "no_repeat_ngram_size": g.no_repeat_ngram_size,
            "max_new_tokens": g.max_new_tokens,
        }
        rows = []
        for _ in range(loader.steps_per_epoch):
            batch = self._inputs(next(loader))
            tokens = model(
                batch, phase="dialogue", knowledge=self.cfg.knowledge, sample=False, generate=gen
            )["tokens"]
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            rows += [
                {"key": k, "context": c, "reference": r, "prediction": p.strip()}
                for k, c, r, p in zip(batch["key"], batch["context_text"], batch["response"], texts)
            ]
        # drop repeats
        rows = list({r["key"]: r for part in self.ctx.gather_objects(rows) for r in part}.values())
        scores = dialogue_scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
        scores["n"] = len(rows)
        return scores, rows

    def export_modules(self, model) -> Dict[str, nn.Module]:
        out = {"iqformer": model.bvif.iqformer}
        if self.cfg.lora.enabled:
            out["llm"] = model.llm
        return out
