"""The IQ-Former: learnable queries that read a frozen encoder's tokens into knowledge vectors.

`num_queries` queries (N(0, 0.02)) go through BERT-style layers with bidirectional
self-attention among the queries, cross-attention to the encoder tokens every
`cross_attention_every` layers and a separate query FFN: transformers' `Blip2QFormerModel`
is exactly that shape (BertModel with cross-attention is causal, so it is not used). Image and
text tokens are projected to the IQ-Former width first, one projection per modality. One
network, two passes: K_I = IQF(queries <- image tokens), K_T = IQF(queries <- text tokens).

It is a `PreTrainedModel`: `mmtrain export` writes it with `save_pretrained`, and
`IQFormer.from_pretrained(dir)` loads it back without the trainer. `init_from_bert` copies a
local BERT checkpoint's self-attention, layer norms and FFN into it and says what stayed random.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, PretrainedConfig, PreTrainedModel

log = logging.getLogger("mmtrain")


class IQFormerConfig(PretrainedConfig):
    model_type = "mmtrain_iqformer"

    def __init__(
        self,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        intermediate: int = 3072,
        num_queries: int = 32,
        cross_attention_every: int = 2,
        vision_width: int = 1024,
        text_width: int = 768,
        dropout: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.width = width
        self.layers = layers
        self.heads = heads
        self.intermediate = intermediate
        self.num_queries = num_queries
        self.cross_attention_every = cross_attention_every
        self.vision_width = vision_width
        self.text_width = text_width
        self.dropout = dropout


class IQFormer(PreTrainedModel):
    config_class = IQFormerConfig
    base_model_prefix = "iqformer"

    def __init__(self, config: IQFormerConfig):
        super().__init__(config)
        c = config
        self.queries = nn.Parameter(torch.randn(1, c.num_queries, c.width) * 0.02)
        self.qformer = Blip2QFormerModel(
            Blip2QFormerConfig(
                hidden_size=c.width,
                num_hidden_layers=c.layers,
                num_attention_heads=c.heads,
                intermediate_size=c.intermediate,
                cross_attention_frequency=c.cross_attention_every,
                encoder_hidden_size=c.width,
                hidden_dropout_prob=c.dropout,
                attention_probs_dropout_prob=c.dropout,
            )
        )
        # projection + LayerNorm per modality (BLIP-2's ln_vision): unit-scale encoder tokens, so
        # that
        # cross-attention moves the queries from the first step and K differs across samples
        self.vision_proj = nn.Sequential(nn.Linear(c.vision_width, c.width), nn.LayerNorm(c.width))
        self.text_proj = nn.Sequential(nn.Linear(c.text_width, c.width), nn.LayerNorm(c.width))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.data.zero_()

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Knowledge vectors (B x num_queries x width) from projected encoder tokens."""
        q = self.queries.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return self.qformer(
            query_embeds=q, encoder_hidden_states=tokens, encoder_attention_mask=mask
        ).last_hidden_state

    def project_image(self, image_states: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(image_states.to(self.queries.dtype))

    def project_text(self, text_states: torch.Tensor) -> torch.Tensor:
        return self.text_proj(text_states.to(self.queries.dtype))

    def read_image(self, image_states: torch.Tensor) -> torch.Tensor:
        return self(self.project_image(image_states))

    def read_text(self, text_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self(self.project_text(text_states), mask)


def bert_key_to_qformer(name: str) -> Optional[str]:
    """BertModel parameter name -> the IQ-Former's, or None where the IQ-Former has no counterpart."""
    name = re.sub(r"^bert\.", "", name)
    if name.startswith("embeddings.LayerNorm."):
        return "qformer.layernorm." + name.split(".")[-1]
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)$", name)
    if not m:
        return None
    i, rest = m.groups()
    rest = rest.replace("attention.self.", "attention.attention.")
    rest = re.sub(r"^intermediate\.", "intermediate_query.", rest)
    rest = re.sub(r"^output\.", "output_query.", rest)
    return f"qformer.encoder.layer.{i}.{rest}"


BERT_SHAPE = {  # IQ-Former config field -> BERT config.json key
    "width": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
}


def bert_shape_mismatch(shape: Dict[str, int], bert_path: str) -> Optional[str]:
    """What differs between an IQ-Former shape (width, layers, heads, intermediate) and the BERT
    in `bert_path` (its config.json), written out; None when they match. A mismatched BERT would
    initialise nothing, silently leaving the IQ-Former random."""
    import json
    from pathlib import Path

    config = Path(bert_path) / "config.json"
    if not config.is_file():
        return f"{bert_path} has no config.json (not a Hugging Face BERT directory)"
    bert = json.loads(config.read_text())
    theirs = {k: bert.get(v) for k, v in BERT_SHAPE.items()}
    if all(shape[k] == theirs[k] for k in BERT_SHAPE):
        return None
    say = lambda d: ", ".join(f"{k} {d[k]}" for k in BERT_SHAPE)  # noqa: E731
    fix = " ".join(f"recipe.iqformer.{k}={theirs[k]}" for k in BERT_SHAPE)
    return f"the BERT in {bert_path} has {say(theirs)}; the IQ-Former has {say(shape)}: set {fix}"


def init_from_bert(model: IQFormer, bert_path: str) -> Dict[str, List[str]]:
    """Copy matching tensors from a local BERT checkpoint; returns {'loaded': [...], 'random': [...]}."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(bert_path)
    own = model.state_dict()
    loaded = []
    with torch.no_grad():
        for name, tensor in bert.state_dict().items():
            target = bert_key_to_qformer(name)
            if target in own and own[target].shape == tensor.shape:
                own[target].copy_(tensor)
                loaded.append(target)
    random_ = sorted(set(own) - set(loaded))
    log.info(
        "IQ-Former from %s: %d tensors loaded, %d start random (%s)",
        bert_path,
        len(loaded),
        len(random_),
        ", ".join(sorted({re.sub(r"\.\d+\.", ".N.", k) for k in random_})),
    )
    return {"loaded": loaded, "random": random_}
