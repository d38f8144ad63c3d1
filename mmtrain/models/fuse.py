"""`FuseModel`: BVIF (mmtrain.models.bvif) around an LLM, the module VIKDF stage 2 trains.

Entry points (called as `model("fusion_losses", seen, ...)`, see mmtrain.models.base), each given
`seen` (a `Knowledge`: the frozen towers' states on the device) and the token ids of the
segments it lays out:
- `fusion_losses(seen, text, instr, target, recon_instr, source, sample)`: image-text pairs;
  contextual inference (CE on the caption from soft prompts of K_T, K_I or both), knowledge
  reconstruction and KL(q || p);
- `dialogue_losses(seen, prefix, middle, target, context, recon_instr, source, sample)`: CE on
  the response, the soft prompts (from `source`: prior, text, image or none) right after the chat
  template's opening;
- `generate(seen, prefix, middle, context, recon_instr, source, **generation kwargs)`: the
  response's new tokens.
`sample=False` takes the latent's mean instead of a draw (evaluation). Token ids are lists of
lists (one per sample, unpadded): the LLM's inputs are laid out here (`embed_segments`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from kernels.gaussian import reparameterize
from mmtrain.models.base import EntryPoints
from mmtrain.models.bvif import (
    BVIF,
    embed_segments,
    labels_for,
    noise,
    pack_segments,
)
from mmtrain.models.packing import per_sample_sums, restarting_positions

Ids = List[List[int]]  # token ids, one unpadded list per sample


@dataclass
class Knowledge:
    """What BVIF reads its knowledge from, on the device; a field is None when its source is not
    used: the frozen vision tower's states, the text tower's states and mask, and the latent's
    noise (None: drawn here)."""

    image_states: Optional[torch.Tensor] = None
    text_states: Optional[torch.Tensor] = None
    text_mask: Optional[torch.Tensor] = None
    eps: Optional[torch.Tensor] = None

    def read(self, iqformer, source: str) -> torch.Tensor:
        """The IQ-Former's knowledge vectors of `source` ("image" or "text")."""
        if source == "image":
            return iqformer.read_image(self.image_states)
        return iqformer.read_text(self.text_states, self.text_mask)


class FuseModel(EntryPoints):
    """The BVIF parts and the LLM (frozen, or carrying a LoRA adapter)."""

    entry_points = ("fusion_losses", "dialogue_losses", "generate", "stage1_losses")

    def __init__(self, bvif: BVIF, llm: nn.Module, pad_id: int, eos_id: int, pack_tokens: int = 0):
        super().__init__()
        self.bvif = bvif
        self.llm = llm
        self.pad_id = pad_id
        self.eos_id = eos_id
        # > 0: the language-model losses' sequences packed into rows of this many positions
        self.pack_tokens = pack_tokens

    def stage1_losses(self, **inputs) -> Dict[str, Any]:
        """Stage 1's losses through its heads (`self.stage1`, set when the recipe keeps them in
        fusion), on the IQ-Former BVIF trains."""
        if not hasattr(self, "stage1"):
            raise ValueError("this FuseModel has no stage-1 heads (recipe.stage1_losses_in_fusion)")
        return self.stage1("losses", **inputs)

    def _embed(self):
        return self.llm.get_input_embeddings()

    def _prior_states(self, instr: List[List[int]], text: List[List[int]]) -> torch.Tensor:
        """The LLM's last hidden states at the placeholders after an instruction and the text."""
        ph = self.bvif.placeholders
        parts = [[a, b, ph] for a, b in zip(instr, text)]
        embeds, mask, spans = embed_segments(self._embed(), parts, self.pad_id)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[-1]
        return torch.stack([h[i, s[2][0] : s[2][1]] for i, s in enumerate(spans)])

    def _lm_loss(
        self, parts: List[List[Any]], target_segment: int, targets: List[List[int]]
    ) -> Dict[str, Any]:
        """Cross-entropy of the target segment: summed ("ce_sum") over its "ce_count" tokens, their
        mean ("ce"), and each sample's summed NLL ("nll", detached). With `pack_tokens` the
        sequences are packed (`pack_segments`), attention kept within each by positions that
        restart at every sequence."""
        if self.pack_tokens:
            embeds, index, placed = pack_segments(
                self._embed(), parts, self.pad_id, self.pack_tokens
            )
            labels = labels_for(placed, index, targets, target_segment)[:, 1:]
            inputs = {"position_ids": restarting_positions(index), "use_cache": False}
        else:
            embeds, mask, spans = embed_segments(self._embed(), parts, self.pad_id)
            labels = labels_for(enumerate(spans), mask, targets, target_segment)[:, 1:]
            inputs = {"attention_mask": mask}
        logits = self.llm(inputs_embeds=embeds, **inputs).logits[:, :-1].float()
        tok = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        count = (labels != -100).sum()  # on the device: no host read in the step
        if self.pack_tokens:
            nll = per_sample_sums(tok, index[:, 1:], len(parts))
        else:
            nll = tok.sum(1)
        return {
            "ce": tok.sum() / count.clamp(min=1),
            "ce_sum": tok.sum(),
            "ce_count": count,
            "nll": nll.detach(),
        }

    def fusion_losses(
        self,
        seen: Knowledge,
        text: Ids,
        instr: Ids,
        target: Ids,
        recon_instr: Ids,
        source: str = "text",
        sample: bool = True,
    ) -> Dict[str, Any]:
        """Fusion's terms for knowledge K_T (`source` "text": the caption read by the text tower
        and the IQ-Former, as released), K_I ("image"), or "both" (each term the mean of the two).
        `text`: the caption (the prior reads it after `recon_instr`); `target`: the caption and
        the end token, predicted after `instr` and the soft prompts."""
        if source == "both":
            text_, image = (
                self.fusion_losses(seen, text, instr, target, recon_instr, k, sample)
                for k in ("text", "image")
            )
            out = {k: (v + image[k]) / 2 for k, v in text_.items() if k not in ("nll", "ce_count")}
            out["ce_sum"] = text_["ce_sum"] + image["ce_sum"]
            out["ce_count"] = text_["ce_count"] + image["ce_count"]
            out["nll"] = (text_["nll"] + image["nll"]) / 2
            return out
        b = self.bvif
        k = seen.read(b.iqformer, source)
        prior_states = self._prior_states(recon_instr, text)
        z, kl, mu_p, lv_p = b.latent(k, prior_states, sample=sample, eps=seen.eps)
        soft = b.to_llm(z)
        out = self._lm_loss([[i, s, t] for i, s, t in zip(instr, soft, target)], 2, target)
        out["recon"] = b.reconstruction_loss(k, mu_p, lv_p)
        if kl is not None:
            out["kl"] = kl
            out["kl_per_dim"] = b.kl_per_dim(kl)
            out["prior_logvar"] = lv_p.detach().float().mean()
        return out

    def soft_prompts(
        self, seen: Knowledge, source: str, context: Ids, recon_instr: Ids, sample: bool
    ) -> torch.Tensor:
        """The soft prompts of a dialogue batch, from the knowledge source `source`: "prior" (the
        LLM's own reading of `context` after `recon_instr`), "text", "image", or "none"."""
        b = self.bvif
        if source == "none":  # input-independent soft prompts (no knowledge)
            return b.to_llm(b.iqformer.queries[0]).expand(len(context), -1, -1)
        if source == "prior":
            mu_p, lv_p = b.prior_stats(self._prior_states(recon_instr, context))
            sampled = sample and b.variational
            return b.to_llm(reparameterize(mu_p, lv_p, noise(mu_p, seen.eps)) if sampled else mu_p)
        return b.to_llm(b.latent(seen.read(b.iqformer, source), None, sample, eps=seen.eps)[0])

    def dialogue_losses(
        self,
        seen: Knowledge,
        prefix: Ids,
        middle: Ids,
        target: Ids,
        context: Ids,
        recon_instr: Ids,
        source: str,
        sample: bool = True,
    ) -> Dict[str, Any]:
        """CE on `target` after `prefix` (the chat template's opening), the soft prompts and
        `middle` (the context and the generation prompt)."""
        soft = self.soft_prompts(seen, source, context, recon_instr, sample)
        segments = zip(prefix, soft, middle, target)
        return self._lm_loss([list(s) for s in segments], 3, target)

    def generate(
        self,
        seen: Knowledge,
        prefix: Ids,
        middle: Ids,
        context: Ids,
        recon_instr: Ids,
        source: str,
        **generation: Any,
    ) -> torch.Tensor:
        soft = self.soft_prompts(seen, source, context, recon_instr, sample=False)
        parts = [[p, s, m] for p, s, m in zip(prefix, soft, middle)]
        embeds, mask, _ = embed_segments(self._embed(), parts, self.pad_id, left_pad=True)
        with warnings.catch_warnings():
            # transformers notes that from embeddings alone, no_repeat_ngram_size can only see
            # the new tokens: here the prompt holds soft prompts, so that is the intent
            warnings.filterwarnings("ignore", "Passing `no_repeat_ngram_size`", UserWarning)
            return self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                **generation,
            )


def load_bvif_state(bvif: BVIF, export_dir: Optional[str]) -> None:
    """The `bvif.*` tensors of a fusion run's export (model.safetensors), into `bvif`."""
    from pathlib import Path

    from safetensors.torch import load_file

    state = load_file(str(Path(export_dir) / "model.safetensors"))
    prefix = "bvif."
    bvif.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
