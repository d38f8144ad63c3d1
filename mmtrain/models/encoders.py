"""Frozen vision and text towers loaded from local Hugging Face directories (CLIP-style; SigLIP too).

They return every token's hidden state (CLS/patches for images, all tokens for text). They run
without gradients, in eval mode, in the training precision. They are deliberately *not* part of
the DeepSpeed-wrapped model: a frozen tower that fits on every GPU is replicated rather than
sharded by ZeRO-3, so it is never gathered, never holds optimizer state and never bloats a
checkpoint; it is reloaded from its directory instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
from torch import nn


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()  # load reports list the other tower's weights as unexpected


def _tower_classes(path: str) -> Tuple[type, type]:
    from transformers import (
        AutoConfig,
        CLIPTextModel,
        CLIPVisionModel,
        SiglipTextModel,
        SiglipVisionModel,
    )

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type.startswith("clip"):
        return CLIPVisionModel, CLIPTextModel
    if model_type.startswith("siglip"):
        return SiglipVisionModel, SiglipTextModel
    raise ValueError(f"{path}: model_type '{model_type}' is not a CLIP- or SigLIP-style checkpoint")


class FrozenTowers(nn.Module):
    def __init__(self, vision_path: str, text_path: str):
        super().__init__()
        _quiet_transformers()
        for p in (vision_path, text_path):
            if not (Path(p) / "config.json").is_file():
                raise FileNotFoundError(f"{p}: not a Hugging Face model directory (no config.json)")
        vision_cls, _ = _tower_classes(vision_path)
        _, text_cls = _tower_classes(text_path)
        self.vision = vision_cls.from_pretrained(vision_path).eval().requires_grad_(False)
        self.text = text_cls.from_pretrained(text_path).eval().requires_grad_(False)

    @property
    def vision_width(self) -> int:
        return self.vision.config.hidden_size

    @property
    def text_width(self) -> int:
        return self.text.config.hidden_size

    @property
    def text_positions(self) -> int:
        """The longest text the text tower reads (77 for CLIP)."""
        return self.text.config.max_position_embeddings

    @property
    def patch_size(self) -> int:
        return self.vision.config.patch_size

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: no dropout in a frozen tower

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vision.parameters()).dtype
        return self.vision(pixel_values=pixels.to(dtype)).last_hidden_state

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=ids, attention_mask=mask).last_hidden_state


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
