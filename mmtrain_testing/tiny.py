"""Tiny random models, saved with `save_pretrained`, so that the demo and the tests load every model
through the same `from_pretrained` path real checkpoints take (nothing is downloaded).

`mmtrain models tiny --out DIR` writes DIR/clip (a CLIP with its image processor and a word-level
tokenizer over the synthetic data's vocabulary), DIR/bert (a BERT to initialise the IQ-Former
from), DIR/llama (a causal LM with the same tokenizer and a chat template) and DIR/qwen2vl (a
Qwen2-VL image-text-to-text model with its processor files; `make_tiny_vlm` also writes Llava).
The LLM is briefly pre-trained on text drawn like the synthetic data (captions, chat-formatted
dialogues from seeds the data sets do not use; a quarter of the dialogues state what is pictured
at the start of the user turn, where the soft prompts later sit), as a real frozen LLM would be:
fusion then
has a language model that reads its context (it copies a stated colour and count into its
answer), and only the pictured facts are left to the knowledge.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import List, Optional

SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "[MASK]"]


def synthetic_vocabulary() -> List[str]:
    """Every word the synthetic generators write (drawn, not listed by hand, so it cannot drift)."""
    import random

    from mmtrain.data import synth

    words = set()
    for kind, gen in synth.GENERATORS.items():
        for i in range(400):
            for split in ("train", "test"):
                s = gen(random.Random(f"vocab/{kind}/{split}/{i}"), split)
                words.update(
                    re.findall(
                        r"[a-z_]+|[0-9]+|[^\sa-z0-9_]",
                        str(s.get("txt", "")) + " " + str(s.get("json", "")).lower(),
                    )
                )
    return sorted(words)


def word_tokenizer(
    words: List[str], specials_in_template: bool = False, extra_special: List[str] = ()
):
    """A word-level tokenizer over `words`. By default it wraps text in <s> ... </s> itself (as the
    CLIP/BERT/Llama tokenizers do); with `specials_in_template` only the chat template writes them
    (as Qwen's tokenizers do), so a templated prompt is never closed by an added </s>."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(words) | {"user", "assistant", "system"})  # the chat template's roles
    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[a-z_]+|[0-9]+|[^\sa-z0-9_]"), behavior="isolated"),
        ]
    )
    if not specials_in_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        mask_token="[MASK]",
    )
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    fast.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant :{% endif %}"
    )
    return fast


def _lm_corpus(tok, n: int = 3000) -> List[str]:
    import random

    from mmtrain.data import synth

    texts = []
    for i in range(n):
        rng = random.Random(f"lm-corpus/{i}")
        if i % 2:
            texts.append(synth.image_text(rng, "train")["txt"])
        else:
            d = synth.dialogue(rng, "train")["json"]
            context = "\n".join(d["context"])
            # some dialogues state what is pictured: the LM learns to read its context
            if i % 4 == 0:
                count = synth.COUNT_WORDS[d["count"]]
                context = (
                    f"the picture shows {count} {d['color']} {synth._noun(d['shape'], d['count'])} .\n"
                    + context
                )
            chat = [
                {"role": "user", "content": context},
                {"role": "assistant", "content": d["response"]},
            ]
            texts.append(tok.apply_chat_template(chat, tokenize=False))
    return texts


def pretrain_lm(
    model, tok, steps: int = 1500, batch: int = 32, lr: float = 3e-3, seed: int = 0
) -> float:
    """Language modelling on synthetic-style text; returns the last loss. 1,500 steps (~25 s on 2
    cores): after ~1,000 the model learns to copy the stated facts into its answer (validation
    perplexity of the responses 1.53 without the facts, 1.004 with them), which at 300 steps it
    barely did (1.54 vs 1.41); the knowledge test needs an LLM that reads its context."""
    import random

    import torch

    encoded = [tok(text)["input_ids"] for text in _lm_corpus(tok)]  # once, not every step
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = None
    for _ in range(steps):
        picked = rng.sample(range(len(encoded)), batch)
        enc = tok.pad({"input_ids": [encoded[i] for i in picked]}, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def _tower(width: int, heads: int, layers: int, intermediate: int) -> dict:
    return dict(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )


def _save_tiny_clip(
    out_dir: Path,
    tok,
    width: int,
    image_size: int,
    patch: int,
    vision: Optional[dict] = None,
    text: Optional[dict] = None,
) -> None:
    """A CLIP over `tok`; `vision` / `text`: tower shapes (`_tower`), else tiny ones `width` wide."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    text = text or _tower(width, 4, 2, 2 * width)
    special = dict(
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=len(tok), max_position_embeddings=77 if vision else 64, **text, **special
            ),
            vision_config=dict(
                **(vision or _tower(width, 4, 2, 2 * width)),
                image_size=image_size,
                patch_size=patch,
            ),
            projection_dim=text["hidden_size"],
        )
    )
    clip.save_pretrained(out_dir / "clip")
    tok.save_pretrained(out_dir / "clip")
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out_dir / "clip")


def padded_vocabulary(size: Optional[int] = None) -> List[str]:
    """The synthetic vocabulary, padded with filler words to about `size` tokens (a released
    tokenizer's size, so that embeddings and vocabulary heads cost what they do at full size)."""
    words = synthetic_vocabulary()
    if size:
        words += [f"filler{i}" for i in range(max(0, size - len(SPECIALS) - len(words) - 3))]
    return words


def iqformer_config(shape: str, **changes):
    """An IQFormerConfig: `published` (bert-base wide, 12 layers, 32 queries, reading CLIP
    ViT-L/14's 1,024-wide vision and 768-wide text states) or `tiny` (the demo's)."""
    from mmtrain.models.iqformer import IQFormerConfig

    shapes = {
        "published": dict(
            width=768,
            layers=12,
            heads=12,
            intermediate=3072,
            num_queries=32,
            cross_attention_every=2,
            vision_width=1024,
            text_width=768,
        ),
        "tiny": dict(
            width=64,
            layers=2,
            heads=4,
            intermediate=128,
            num_queries=8,
            cross_attention_every=1,
            vision_width=64,
            text_width=64,
        ),
    }
    return IQFormerConfig(**{**shapes[shape], **changes})


def make_vikdf_towers_at_published_widths(
    out: str, full_depth: bool = False, vocab_size: Optional[int] = None
) -> Path:
    """OUT/clip and OUT/bert with the shapes configs/vikdf/stage1.yaml names: CLIP ViT-L/14 (224
    px; 1,024-wide vision with 16 heads, 768-wide text with 12) and bert-base (768 wide, 12
    heads), random weights, over the word tokenizer. One layer a tower and the IQ-Former's two,
    or with `full_depth` the released 24 / 12 / 12 (for benchmarks); `vocab_size` pads the
    vocabulary with filler words (CLIP's is 49,408) so that embeddings and the IA-MTM head cost
    what the released ones do."""
    import torch
    from transformers import BertConfig, BertModel

    out_dir = Path(out)
    tok = word_tokenizer(padded_vocabulary(vocab_size))
    torch.manual_seed(0)
    depth = (24, 12, 12) if full_depth else (1, 1, 2)
    vision, text = _tower(1024, 16, depth[0], 4096), _tower(768, 12, depth[1], 3072)
    _save_tiny_clip(out_dir, tok, 768, 224, 14, vision=vision, text=text)
    BertModel(BertConfig(vocab_size=len(tok), **_tower(768, 12, depth[2], 3072))).save_pretrained(
        out_dir / "bert"
    )
    return out_dir


def make_tiny_vikdf_towers(out: str, width: int = 64, image_size: int = 64) -> Path:
    """OUT/clip and OUT/bert of `make_tiny` alone (no LLM, no VLM)."""
    import torch
    from transformers import BertConfig, BertModel

    out_dir = Path(out)
    tok = word_tokenizer(synthetic_vocabulary())
    torch.manual_seed(0)
    _save_tiny_clip(out_dir, tok, width, image_size, 8)
    BertModel(BertConfig(vocab_size=len(tok), **_tower(width, 4, 2, 2 * width))).save_pretrained(
        out_dir / "bert"
    )
    return out_dir


def _decoder(tok, width: int, positions: int, **extra) -> dict:
    """A two-layer decoder's config over `tok` (Llama, or a VLM's language model)."""
    config = dict(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return {**config, **extra}


def make_llama_at_published_width(
    out: str, layers: int = 1, vocab_size: Optional[int] = None, dtype=None, device=None
) -> Path:
    """OUT: a Llama with Llama-2-7B's widths and head counts (4,096 wide, 32 heads, 11,008-wide
    MLP), `layers` layers (32 for the released depth, in benchmarks), random weights, over the
    word tokenizer padded to `vocab_size` (Llama-2's is 32,000): what configs/vikdf/stage2_*.yaml
    name. `dtype` / `device`: where it is built (bf16 on a GPU for the 7B)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out)
    tok = word_tokenizer(padded_vocabulary(vocab_size))
    torch.manual_seed(0)
    shape = dict(
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    default = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device or "cpu"):
            llm = LlamaForCausalLM(LlamaConfig(**_decoder(tok, 4096, 4096, **shape)))
    finally:
        torch.set_default_dtype(default)
    llm.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_llama(out: str, width: int = 64) -> Path:
    """OUT: `make_tiny`'s Llama alone, untrained (for smoke runs that only time a step)."""
    import torch

    out_dir = Path(out)
    tok = word_tokenizer(synthetic_vocabulary())
    torch.manual_seed(0)
    _tiny_llama(tok, width).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _tiny_llama(tok, width: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_decoder(tok, width, positions=256)))


def make_tiny(
    out: str, image_size: int = 64, patch: int = 8, width: int = 64, seed: int = 0
) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    out_dir = Path(out)
    tok = word_tokenizer(synthetic_vocabulary())
    torch.manual_seed(seed)
    _save_tiny_clip(out_dir, tok, width, image_size, patch)
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * width,
        )
    ).save_pretrained(out_dir / "bert")
    llm = _tiny_llama(tok, width)
    pretrain_lm(llm, tok)
    llm.save_pretrained(out_dir / "llama")
    tok.save_pretrained(out_dir / "llama")
    make_tiny_vlm(str(out_dir / "qwen2vl"), "qwen2_vl", width=width, seed=seed)
    return out_dir


# A chat template in the shape of Qwen2-VL's: images are placeholders inside the user turn.
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ IMAGE }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant :{% endif %}"
)
THINK_TOKENS = ["<think>", "</think>"]


# Qwen2-VL-2B/7B-Instruct's widths and head counts (config.json of the released checkpoints);
# the vision tower (675M in both) is 1,280 wide with 16 heads, its merger projects 2x2 patches to
# the language model's width. `make_tiny_vlm(..., shape="2b")` builds them with one layer a stack.
QWEN2_VL_SHAPES = {
    "2b": dict(
        hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2
    ),
    "7b": dict(
        hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4
    ),
}


def _qwen2_vl_stacks(tok, width: int, shape: Optional[str]):
    """(text config, vision config) of the tiny Qwen2-VL: tiny, or a released `shape`'s widths."""
    if shape is None:
        text = _decoder(
            tok,
            width,
            positions=512,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
        )
        return text, dict(depth=2, embed_dim=32, hidden_size=width, num_heads=2, mlp_ratio=2)
    text = _decoder(
        tok,
        QWEN2_VL_SHAPES[shape]["hidden_size"],
        positions=4096,
        num_hidden_layers=1,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},  # head dim 128
        **QWEN2_VL_SHAPES[shape],
    )
    vision = dict(
        depth=1, embed_dim=1280, hidden_size=text["hidden_size"], num_heads=16, mlp_ratio=4
    )
    return text, vision


def _tiny_qwen2_vl(words, width: int, shape: Optional[str] = None):
    """(tokenizer, model, image processor, image placeholder, processor class, extra settings);
    `shape`: a released model's widths (QWEN2_VL_SHAPES) with one layer per stack."""
    from tokenizers import AddedToken
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tok = word_tokenizer(
        words,
        specials_in_template=True,
        extra_special=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    )
    tok.add_tokens([AddedToken(t, normalized=False) for t in THINK_TOKENS])
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    }
    text, vision = _qwen2_vl_stacks(tok, width, shape)
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            **vision,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(cfg)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56,
        max_pixels=112 * 112,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    processor_class = "Qwen2VLProcessor"
    extra = {}
    return tok, model, image_processor, image, processor_class, extra


def _tiny_llava(words, width: int):
    """(tokenizer, model, image processor, image placeholder, processor class, extra settings)."""
    from tokenizers import AddedToken
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

    tok = word_tokenizer(words, specials_in_template=True, extra_special=["<image>"])
    tok.add_tokens([AddedToken(t, normalized=False) for t in THINK_TOKENS])
    size, patch = 32, 8
    cfg = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=size,
            patch_size=patch,
            projection_dim=width,
        ),
        text_config=dict(model_type="llama", **_decoder(tok, width, positions=512)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(size // patch) ** 2,
    )
    model = LlavaForConditionalGeneration(cfg)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    image = "<image>"
    processor_class = "LlavaProcessor"
    extra = {
        "patch_size": patch,
        "vision_feature_select_strategy": "default",
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
    }
    return tok, model, image_processor, image, processor_class, extra


def make_tiny_vlm(
    out: str, kind: str = "qwen2_vl", width: int = 64, seed: int = 0, shape: Optional[str] = None
) -> Path:
    """A tiny image-text-to-text model with its processor files, in the layout of a hub checkpoint:
    `qwen2_vl` (Qwen2-VL: dynamic-resolution patches, M-RoPE) or `llava` (CLIP tower + projector +
    Llama). `shape` ("2b", "7b"; qwen2_vl): the released model's widths, one layer per stack."""
    import json

    import torch

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    words = synthetic_vocabulary()
    builders = {"qwen2_vl": _tiny_qwen2_vl, "llava": _tiny_llava}
    if kind not in builders:
        raise ValueError(f"kind must be qwen2_vl or llava, got {kind!r}")
    build = builders[kind]
    if shape is not None:
        if kind != "qwen2_vl":
            raise ValueError(f"shape={shape!r} is for kind qwen2_vl, not {kind!r}")
        build = functools.partial(_tiny_qwen2_vl, shape=shape)
    tok, model, image_processor, image, processor_class, extra = build(words, width)
    tok.chat_template = VLM_CHAT_TEMPLATE.replace("{{ IMAGE }}", image)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(
        json.dumps({"processor_class": processor_class, **extra}, indent=2)
    )
    return out_dir
