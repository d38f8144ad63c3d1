"""VIKDF stage 2, `recipe.phase=dialogue`: zero-resource dialogue fine-tuning after fusion.

Dialogue shards: the context gives knowledge (`recipe.knowledge`: prior = the LLM's own reading
of the context, the default and the zero-resource setting; text = text tower + IQ-Former;
image = the pictured scene when a dialogue has one; none = input-independent soft prompts, the
no-knowledge baseline), whose soft prompts sit right after the chat template's opening; CE on
the response. Evaluation: perplexity, and generation with the dialogue scores (mmtrain's or the
authors' released definitions, `recipe.metrics`).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from mmtrain.data.reader import SampleDecoder
from mmtrain.metrics.dialogue import dialogue_scores, released_scores
from mmtrain.models.fuse import Knowledge
from mmtrain.recipes.base import EvalResult
from mmtrain.recipes.common import gather_rows
from mmtrain.recipes.vikdf.collate import DialogueBatch, DialogueCollate
from mmtrain.recipes.vikdf.fuse import VIKDFFuse


class VIKDFDialogue(VIKDFFuse, phase="dialogue"):
    def pipeline(self):
        c, t = self.cfg, self.towers
        need_image = c.knowledge == "image"
        collate = DialogueCollate(
            c, self.tokenizer, self.text_tokenizer, self.ctx.seed, t.text_positions
        )
        return SampleDecoder(self.transform if need_image else None, need_image), collate

    def losses(self, model, batch: DialogueBatch, seen: Knowledge, sample: bool) -> Dict[str, Any]:
        return model(
            "dialogue_losses",
            seen,
            batch.prefix,
            batch.middle,
            batch.target,
            batch.context,
            batch.recon_instr,
            self.cfg.knowledge,
            sample=sample,
        )

    @torch.no_grad()
    def evaluate(self, model, split: str = "val") -> EvalResult:
        """Perplexity (and with `recipe.eval_generate`, the generation scores) during training."""
        result = super().evaluate(model, split)
        if self.cfg.data.val and self.cfg.eval_generate:
            result.metrics.update(self.generate(model, split).metrics)
        return result

    @torch.no_grad()
    def score(self, model, split: str) -> EvalResult:
        """`mmtrain eval`: perplexity, the generations and their scores; a row per sample with
        its target's NLL and tokens and its generation."""
        ppl = self.perplexity(model, split)
        generated = self.generate(model, split)
        nll = {r["key"]: r for r in ppl.rows}
        rows = [{**r, **nll[r["key"]]} for r in generated.rows]
        return EvalResult({**ppl.metrics, **generated.metrics}, rows=rows)

    @torch.no_grad()
    def generate(self, model, split: str) -> EvalResult:
        """Generate for every dialogue of the split (each rank its part), gather, score."""
        loader = self.eval_loader(split)
        # ranks stop generating at different lengths: synced, so that a LoRA LLM inside the
        # ZeRO-3 model runs the same forwards (and parameter gathers) on every rank
        gen = {**self.cfg.generation.kwargs(), "synced_gpus": self.ctx.world_size > 1}
        rows = []
        for b in self.eval_batches(loader):
            tokens = model(
                "generate",
                self.seen(b),
                b.prefix,
                b.middle,
                b.context,
                b.recon_instr,
                self.cfg.knowledge,
                **gen,
            )
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            rows += [
                {
                    "key": k,
                    "context": c,
                    "reference": r[0],
                    "references": r,
                    "prediction": p.strip(),
                }
                for k, c, r, p in zip(b.key, b.context_text, b.references, texts)
            ]
        rows = gather_rows(self.ctx, rows)
        scorer = released_scores if self.cfg.metrics == "released" else dialogue_scores
        scores = scorer([r["prediction"] for r in rows], [r["references"] for r in rows])
        return EvalResult({**scores, "n": len(rows)}, rows=rows)
