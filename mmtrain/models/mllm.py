"""Any local HF image-text-to-text model directory (Qwen2-VL-style, Llava-style) with its processor,
LoRA through peft or full fine-tuning, prompts through the model's chat template, loss on the
answer tokens only.

- `load_processor(path)`: `AutoProcessor`; where torchvision is missing (the CPU CI image), the
  processors that also declare a video processor (Qwen2-VL) cannot be built by `AutoProcessor`,
  so the same processor class is built from the directory's image processor and tokenizer alone.
- `Prompter`: messages -> the chat template's prompt, one sample at a time, with the image
  placeholders expanded by the processor; and the template's end-of-turn text after an answer,
  so the target teaches the model to stop the way the template ends a turn.
- `MLLM`: the trainable module, with entry points `losses` (the answer-token losses) and
  `generate` (the new tokens). Under ZeRO-3 a text-only batch must still run the vision tower:
  `mmtrain.parallelize.keep_vision_in_graph` sees to that.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from mmtrain.models.base import EntryPoints
from mmtrain.models.lora import LoraSection, apply_lora, use_adapter
from mmtrain.parallelize import numel
from mmtrain.schema import ConfigError

SENTINEL = "\u2063ANSWER\u2063"


def _image_only_processor(path: str):
    """The directory's processor class, built without its video processor (needs torchvision)."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    cfg = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = Path(path) / name
        if f.is_file():
            cfg = {**json.loads(f.read_text()), **cfg}
    cls_name = cfg.get("processor_class")
    if not cls_name or not hasattr(transformers, cls_name):
        raise ConfigError(
            f"{path}: cannot tell the processor class (processor_config.json 'processor_class')"
        )
    base = getattr(transformers, cls_name)
    cls = type(
        cls_name, (base,), {"check_argument_for_proper_class": lambda self, name, arg: type(arg)}
    )
    tok, image_processor = (
        AutoTokenizer.from_pretrained(path),
        AutoImageProcessor.from_pretrained(path),
    )
    kwargs = {
        k: v
        for k, v in cfg.items()
        if k
        in (
            "patch_size",
            "vision_feature_select_strategy",
            "image_token",
            "num_additional_image_tokens",
        )
    }
    attrs = (
        base.get_attributes()
        if hasattr(base, "get_attributes")
        else ["image_processor", "tokenizer"]
    )
    given = {"image_processor": image_processor, "tokenizer": tok}
    args = {a: given.get(a) for a in attrs}
    return cls(**args, chat_template=tok.chat_template, **kwargs)


def load_processor(path: str, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
    """The model directory's processor; `min_pixels` / `max_pixels` bound the pixels an image is
    resized to (Qwen2-VL-style processors: a 1080p screenshot is ~2.6k LLM tokens at the default
    bounds, the largest ~16k)."""
    from transformers import AutoProcessor

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
    try:
        proc = AutoProcessor.from_pretrained(path)
    except ImportError as e:
        if "orchvision" not in str(e):
            raise
        proc = _image_only_processor(path)
    if min_pixels or max_pixels:
        _bound_pixels(proc.image_processor, min_pixels, max_pixels)
    return proc


def _bound_pixels(image_processor, min_pixels: Optional[int], max_pixels: Optional[int]) -> None:
    size = dict(image_processor.size or {})
    if "longest_edge" not in size:  # Qwen2-VL keeps its pixel bounds there
        raise ValueError(
            f"recipe.min_pixels / max_pixels apply to processors that resize by pixel count "
            f"(Qwen2-VL style); {type(image_processor).__name__} has size {size}"
        )
    lo, hi = min_pixels or size["shortest_edge"], max_pixels or size["longest_edge"]
    if lo > hi:
        raise ValueError(f"recipe.min_pixels={lo} is above recipe.max_pixels={hi}")
    image_processor.size = {"shortest_edge": lo, "longest_edge": hi}


class Prompter:
    """Chat-templated prompts and answers for one model's processor."""

    def __init__(self, processor, system: Optional[str] = None):
        self.proc = processor
        self.tok = processor.tokenizer
        self.system = system
        head, tail = self.render("x", SENTINEL).split(SENTINEL)
        prompt = self.render("x")
        if not head.startswith(prompt):
            raise ValueError(
                "the chat template's assistant turn does not extend its generation prompt; "
                "answer-only loss needs it to"
            )
        self.answer_lead = head[len(prompt) :]  # template text between the prompt and the answer
        self.end_of_turn = tail  # template text after the answer (e.g. '<|im_end|>')

    def messages(
        self, text: str, answer: Optional[str] = None, image: bool = False
    ) -> List[Dict[str, Any]]:
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        msgs = (
            [{"role": "system", "content": [{"type": "text", "text": self.system}]}]
            if self.system
            else []
        )
        msgs.append({"role": "user", "content": content})
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return msgs

    def render(self, text: str, answer: Optional[str] = None, image: bool = False) -> str:
        return self.proc.apply_chat_template(
            self.messages(text, answer, image), tokenize=False, add_generation_prompt=answer is None
        )

    def encode_prompt(self, text: str, image=None) -> Dict[str, torch.Tensor]:
        """One sample's prompt: input_ids and the model's other inputs (pixels, grid, token types)."""
        kw = {"images": [image]} if image is not None else {}
        enc = self.proc(
            text=[self.render(text, image=image is not None)],
            return_tensors="pt",
            add_special_tokens=False,
            **kw,
        )
        return {k: v for k, v in enc.items()}

    def encode_answer(self, answer: str) -> List[int]:
        return self.tok(self.answer_lead + answer + self.end_of_turn, add_special_tokens=False)[
            "input_ids"
        ]


def collate_sequences(
    prompts: Sequence[Dict[str, torch.Tensor]],
    answers: Optional[Sequence[List[int]]],
    pad_id: int,
    left_pad: bool = False,
    scored: Optional[Sequence[List[int]]] = None,
) -> Dict[str, torch.Tensor]:
    """Per-sample prompts (+ answer ids) -> one padded batch. Token-aligned inputs (ids, mask, token
    types) are extended with the answer and padded; the rest (pixels, grids) concatenated.
    `scored` (0/1 per answer token) marks the tokens `MLLM.losses` reports per sample apart
    ("per_sample_scored"), e.g. the answer without its chat-template tokens."""
    seqs, extras = [], {}
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[-1]
        ans = list(answers[i]) if answers is not None else []
        row = {
            "input_ids": torch.cat([p["input_ids"][0], torch.tensor(ans, dtype=torch.long)]),
            "attention_mask": torch.ones(n + len(ans), dtype=torch.long),
            "labels": torch.tensor([-100] * n + ans, dtype=torch.long),
        }
        if scored is not None:
            row["scored"] = torch.tensor([0] * n + list(scored[i]), dtype=torch.long)
        for k, v in p.items():
            if k in ("input_ids", "attention_mask"):
                continue
            # token-aligned (mm_token_type_ids)
            if v.dim() == 2 and v.shape == p["input_ids"].shape:
                row[k] = torch.cat([v[0], torch.zeros(len(ans), dtype=v.dtype)])
            else:
                extras.setdefault(k, []).append(v)
        seqs.append(row)
    width = max(len(r["input_ids"]) for r in seqs)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    out = {}
    for k in seqs[0]:
        rows = []
        for r in seqs:
            pad = torch.full((width - len(r[k]),), fill.get(k, 0), dtype=r[k].dtype)
            rows.append(torch.cat([pad, r[k]]) if left_pad else torch.cat([r[k], pad]))
        out[k] = torch.stack(rows)
    out.update({k: torch.cat(v) for k, v in extras.items()})
    if answers is None:
        out.pop("labels")
    return out


class MLLM(EntryPoints):
    """The image-text-to-text model (or its peft wrapper) as one trainable module; entry points
    `losses` (answer-token losses) and `generate` (new tokens), each through one named LoRA
    adapter when given."""

    entry_points = ("losses", "generate")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # full sizes, also of parameters partitioned as they loaded (RunContext.partitioned)
        self._n_params = sum(numel(p) for p in model.parameters())
        self._n_trained = sum(numel(p) for p in model.parameters() if p.requires_grad)
        # whether the transformers model can compute logits for the last N positions only
        forward = inspect.signature(self.base_model().forward).parameters
        self._keeps_logits = "logits_to_keep" in forward

    def base_model(self) -> nn.Module:
        """The transformers model under any peft wrapper."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        dev = self.model.get_input_embeddings().weight.device
        dtype = next(p.dtype for p in self.parameters() if p.is_floating_point())
        return {
            k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev))
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k not in ("labels", "scored")
        }

    def losses(
        self, batch: Dict[str, torch.Tensor], adapter: Optional[str] = None
    ) -> Dict[str, torch.Tensor]:
        """The answer tokens' summed loss ("loss_sum") over their count ("tokens"), their mean,
        each sample's mean ("per_sample") and summed ("nll_sum") loss, and the step's FLOPs."""
        # position t predicts token t + 1; only the positions from the batch's first answer token
        # on reach the vocabulary head (the prompt and its image tokens, most of a sequence, never
        # do: a 152k-wide head over every position was most of the activation memory)
        # (the batch's labels and mask are host tensors: read through numpy, which refuses a
        # device tensor, so that no read here waits for the device)
        labels = batch["labels"][:, 1:]
        answered = (labels != -100).any(0).numpy().nonzero()[0]
        first = int(answered[0]) if len(answered) else labels.shape[1] - 1
        with use_adapter(self.model, adapter):
            inputs = self._inputs(batch)
            if self._keeps_logits:
                logits = self.model(**inputs, logits_to_keep=labels.shape[1] + 1 - first).logits
            else:
                logits = self.model(**inputs).logits[:, first:]
        labels = labels[:, first:].to(logits.device)
        pick = labels != -100
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1][pick].float(), labels[pick], reduction="none"
        )
        per_token = torch.zeros(labels.shape, dtype=ce.dtype, device=ce.device).masked_scatter(
            pick, ce
        )
        counts = pick.sum(1).clamp(min=1)
        loss_sum = ce.sum()
        tokens = pick.sum()  # on the device, like the losses
        out = {
            "loss": loss_sum / tokens.clamp(min=1),
            "loss_sum": loss_sum,
            "per_sample": (per_token.sum(1) / counts).detach(),
            "nll_sum": per_token.sum(1).detach(),
            "tokens": tokens,
            "flops": self.train_flops(int(batch["attention_mask"].numpy().sum())),
        }
        if "scored" in batch:
            scored = batch["scored"].to(per_token.device)[:, 1 + first :].to(per_token.dtype)
            out["per_sample_scored"] = (
                (per_token * scored).sum(1) / scored.sum(1).clamp(min=1)
            ).detach()
        return out

    def train_flops(self, tokens: int) -> float:
        """Approximate FLOPs of a training step over `tokens` sequence positions (text and image
        placeholders): 2 per parameter per token forward, 2 more for the activation gradients, and 2
        more for the weight gradients of what trains (all of it, or a LoRA adapter's few)."""
        return float(tokens) * (4 * self._n_params + 2 * self._n_trained)

    @torch.no_grad()
    def generate(
        self, batch: Dict[str, torch.Tensor], adapter: Optional[str] = None, **kwargs
    ) -> torch.Tensor:
        with use_adapter(self.model, adapter):
            inputs = self._inputs(batch)
            out = self.model.generate(**inputs, **kwargs)
        return out[:, inputs["input_ids"].shape[1] :]


def load_model(
    path: str,
    lora: LoraSection,
    adapters: Sequence[str] = ("default",),
    init_from: Optional[str] = None,
) -> nn.Module:
    """The image-text-to-text model: fully trainable (`lora.enabled` false), or frozen with one
    trainable LoRA adapter per name in `adapters` (`apply_lora`). `init_from`: saved adapters."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    if not lora.enabled:
        return model.requires_grad_(True)
    return apply_lora(model, lora, adapters, init_from)
