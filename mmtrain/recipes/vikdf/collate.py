"""VIKDF's micro-batches, typed, and the collates that make them in the data workers.

Stage 1 (`Stage1Batch`): captions tokenised for the text tower, the TA-MIM and IA-MTM masks drawn
per sample from (seed, key), so they survive a resume. Fusion (`FusionBatch`) and dialogue
(`DialogueBatch`): the LLM's segments as unpadded token ids (templates drawn per sample key), the
text tower's ids when it reads the text, uint8 images when the image is read. Images are
normalised on the device (`Pixels`), where the TA-MIM view is made too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import default_collate
from mmtrain.models.bvif import pick
from mmtrain.recipes.base import Batch

Ids = List[List[int]]  # token ids, one unpadded list per sample
SENTINEL = "\u2063KNOWLEDGE\u2063"


@dataclass
class Stage1Batch(Batch):
    key: List[str]
    ids: torch.Tensor  # the captions for the text tower, padded to max_text_len
    attn: torch.Tensor
    masked_ids: torch.Tensor  # IA-MTM's view: selected tokens replaced by the mask token
    labels: torch.Tensor  # IA-MTM's targets: the selected tokens' ids, -100 elsewhere
    zeroed: torch.Tensor  # TA-MIM: the patches zeroed in the masked view (a bool grid)
    scored: torch.Tensor  # TA-MIM: the patches scored (zeroed ones and some left visible)
    pixels: Optional[torch.Tensor] = None  # uint8 images (None: the fusion batch holds them)


@dataclass
class FusionBatch(Batch):
    key: List[str]
    text: Ids  # the caption, for the LLM (the prior reads it)
    target: Ids  # the caption and the end token, predicted after the soft prompts
    instr: Ids  # the inference instruction before the soft prompts
    recon_instr: Ids  # the reconstruction instruction the prior reads first
    pixels: Optional[torch.Tensor] = None  # uint8, when K_I (or stage 1's losses) needs them
    text_ids: Optional[torch.Tensor] = None  # the caption for the text tower (K_T)
    text_attn: Optional[torch.Tensor] = None
    stage1: Optional[Stage1Batch] = None  # with recipe.stage1_losses_in_fusion


@dataclass
class DialogueBatch(Batch):
    key: List[str]
    prefix: Ids  # the chat template's opening, before the soft prompts
    middle: Ids  # the context and the generation prompt, after them
    target: Ids  # the response and the end token
    context: Ids  # the context's most recent tokens, which the prior reads
    recon_instr: Ids
    context_text: List[str]
    response: List[str]
    references: List[List[str]]  # every reference of a response (e.g. one per annotator)
    pixels: Optional[torch.Tensor] = None  # uint8, with recipe.knowledge=image
    text_ids: Optional[torch.Tensor] = None  # the context for the text tower (knowledge=text)
    text_attn: Optional[torch.Tensor] = None


def block_mask(rng: random.Random, grid: int, block: int, ratio: float, visible: float):
    """(zeroed, scored) patch masks, grid x grid bool: SimMIM blocks, some masked blocks left visible."""
    nb = max(1, grid // block)
    blocks = list(range(nb * nb))
    masked = rng.sample(blocks, max(1, round(ratio * len(blocks))))
    shown = set(rng.sample(masked, int(visible * len(masked))))
    zeroed, scored = (
        torch.zeros(grid, grid, dtype=torch.bool),
        torch.zeros(grid, grid, dtype=torch.bool),
    )
    for b in masked:
        r, c = divmod(b, nb)
        sl = (slice(r * block, (r + 1) * block), slice(c * block, (c + 1) * block))
        scored[sl] = True
        if b not in shown:
            zeroed[sl] = True
    return zeroed, scored


class Stage1Collate:
    """Tokenise captions, draw the TA-MIM and IA-MTM masks (per sample, from seed and key)."""

    def __init__(self, tokenizer, cfg, grid: int, patch: int, seed: int):
        self.tok = tokenizer
        self.cfg = cfg  # a Stage1Config
        self.grid = grid
        self.patch = patch
        self.seed = seed
        self.mask_id = (
            tokenizer.mask_token_id
            if tokenizer.mask_token_id is not None
            else tokenizer.eos_token_id
        )
        self.special = set(tokenizer.all_special_ids)

    def __call__(self, items: List[Dict[str, Any]]) -> Stage1Batch:
        batch = default_collate(items)
        texts = batch.get("text") or [m["caption"] for m in batch["meta"]]
        enc = self.tok(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.cfg.max_text_len,
            return_tensors="pt",
        )
        ids, attn = enc["input_ids"], enc["attention_mask"]
        masked_ids, labels = ids.clone(), torch.full_like(ids, -100)
        zeroed, scored = [], []
        for i, key in enumerate(batch["key"]):
            rng = random.Random(f"{self.seed}/masks/{key}")
            c = self.cfg
            z, s = block_mask(rng, self.grid, c.mim_block, c.mim_ratio, c.mim_visible)
            zeroed.append(z)
            scored.append(s)
            cand = [
                j for j in range(ids.shape[1]) if attn[i, j] and int(ids[i, j]) not in self.special
            ]
            if not cand:
                continue
            chosen = [j for j in cand if rng.random() < c.mtm_prob] or [rng.choice(cand)]
            for j in chosen:
                labels[i, j] = ids[i, j]
                if rng.random() < c.mtm_replace:
                    masked_ids[i, j] = self.mask_id
        return Stage1Batch(
            key=batch["key"],
            ids=ids,
            attn=attn,
            masked_ids=masked_ids,
            labels=labels,
            zeroed=torch.stack(zeroed),
            scored=torch.stack(scored),
            pixels=batch.get("image"),
        )


class Pixels:
    """A batch's uint8 images onto the device, each copied once (asynchronously from pinned memory):
    normalised for the vision tower there, and the TA-MIM view made there from the bool patch grid,
    instead of shipping a second fp32 image."""

    def __init__(self, transform: ImageTransform, patch: int, device: torch.device):
        self.transform, self.patch, self.device = transform, patch, device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.transform.normalize(pixels.to(self.device, non_blocking=True))

    def masked(self, pixels: torch.Tensor, zeroed: torch.Tensor) -> torch.Tensor:
        """`pixels` (normalised, on the device) with the patches `zeroed` marks set to 0."""
        keep = ~zeroed.to(self.device, non_blocking=True)
        keep = keep.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2)
        return pixels * keep[:, None]


class LLMCollate:
    """What fusion and dialogue batches share: the LLM's tokenisation, the text tower's, and the
    templates drawn per sample key."""

    def __init__(self, cfg, tok, text_tok, seed: int, text_positions: Optional[int] = None):
        self.cfg = cfg  # a FuseConfig
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

    def templates(self, templates: List[str], keys: List[str]) -> Ids:
        """A template per sample, drawn from (seed, key), tokenised after the begin token."""
        return [self.bos + self.ids(pick(templates, k, self.seed)) for k in keys]

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


class FusionCollate(LLMCollate):
    """Image-text pairs for fusion; with `stage1` (stage 1's collate), its masks and captions too."""

    def __init__(self, cfg, tok, text_tok, seed, text_positions=None, stage1=None):
        super().__init__(cfg, tok, text_tok, seed, text_positions)
        self.stage1: Optional[Stage1Collate] = stage1

    def __call__(self, items: List[Dict[str, Any]]) -> FusionBatch:
        batch = default_collate(items)
        keys, c = batch["key"], self.cfg
        captions = batch.get("text") or [m["caption"] for m in batch["meta"]]
        text = [self.ids(t, c.max_text_len) for t in captions]
        out = FusionBatch(
            key=keys,
            text=text,
            target=[t + self.eos for t in text],
            instr=self.templates(c.inference_templates, keys),
            recon_instr=self.templates(c.reconstruction_templates, keys),
            pixels=batch.get("image"),
        )
        if c.fusion_knowledge != "image":  # K_T: the text tower reads the caption
            out.text_ids, out.text_attn = self.text_tower_ids(captions, "right")
        if self.stage1 is not None:  # its masks and captions; the images are shipped once
            out.stage1 = self.stage1([{k: v for k, v in i.items() if k != "image"} for i in items])
        return out


class DialogueCollate(LLMCollate):
    """Dialogues: the soft prompts' slot right after the chat template's opening."""

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

    def __call__(self, items: List[Dict[str, Any]]) -> DialogueBatch:
        batch = default_collate(items)
        keys, c, metas = batch["key"], self.cfg, batch["meta"]
        contexts = [m["context"] for m in metas]
        split = [self.chat_split(ctx) for ctx in contexts]
        responses = [m["response"] for m in metas]
        context_text = ["\n".join(ctx) for ctx in contexts]
        out = DialogueBatch(
            key=keys,
            prefix=[s[0] for s in split],
            middle=[s[1] for s in split],
            target=[self.ids(r, c.max_text_len) + self.eos for r in responses],
            # a long context keeps its most recent tokens wherever it is read: the prompt
            # (`middle`), the prior's reading and the text tower
            context=[self.ids(t)[-c.max_text_len * 2 :] for t in context_text],
            recon_instr=self.templates(c.reconstruction_templates, keys),
            context_text=context_text,
            response=responses,
            references=[m.get("responses") or [m["response"]] for m in metas],
            pixels=batch.get("image"),
        )
        if c.knowledge == "text":  # only the text tower reads these
            out.text_ids, out.text_attn = self.text_tower_ids(context_text, "left")
        return out
