"""Any local HF image-text-to-text model directory (Qwen2-VL-style, Llava-style) with its processor,
LoRA through peft or full fine-tuning, prompts through the model's chat template, loss on the
answer tokens only.

- `load_processor(path)`: `AutoProcessor`; where torchvision is missing (the CPU CI image), the
  processors that also declare a video processor (Qwen2-VL) cannot be built by `AutoProcessor`,
  so the same processor class is built from the directory's image processor and tokenizer alone.
- `Prompter`: messages -> the chat template's prompt, one sample at a time, with the image
  placeholders expanded by the processor; and the template's end-of-turn text after an answer,
  so the target teaches the model to stop the way the template ends a turn.
- `MLLM`: the trainable module. `forward(batch)` returns the mean answer-token loss and the loss
  of each sample; `generate(batch)` the new tokens. A batch without images still runs the vision
  tower, on a blank image, right after the token embedding (where a batch with images runs it):
  every rank then touches the same parameters in the same order on every step, which ZeRO-3
  needs (its parameter gathers are collectives) when one rank's micro-batch is text-only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from mmtrain.config import ConfigError, LoraSection

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


def load_processor(path: str):
    from transformers import AutoProcessor

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as e:
        if "orchvision" not in str(e):
            raise
        return _image_only_processor(path)


class Prompter:
    """Chat-templated prompts and answers for one model's processor."""

    def __init__(self, processor, system: Optional[str] = None):
        self.proc, self.tok, self.system = processor, processor.tokenizer, system
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
) -> Dict[str, torch.Tensor]:
    """Per-sample prompts (+ answer ids) -> one padded batch. Token-aligned inputs (ids, mask, token
    types) are extended with the answer and padded; the rest (pixels, grids) concatenated."""
    seqs, extras = [], {}
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[-1]
        ans = list(answers[i]) if answers is not None else []
        row = {
            "input_ids": torch.cat([p["input_ids"][0], torch.tensor(ans, dtype=torch.long)]),
            "attention_mask": torch.ones(n + len(ans), dtype=torch.long),
            "labels": torch.tensor([-100] * n + ans, dtype=torch.long),
        }
        for k, v in p.items():
            if k in ("input_ids", "attention_mask"):
                continue
            if (
                v.dim() == 2 and v.shape == p["input_ids"].shape
            ):  # token-aligned (mm_token_type_ids)
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


def _tensor_sum(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float().sum()
    if isinstance(x, dict) or hasattr(x, "values"):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        parts = [_tensor_sum(v) for v in x if v is not None]
        return sum(parts) if parts else torch.zeros(())
    return torch.zeros(())


class MLLM(nn.Module):
    """The image-text-to-text model (or its peft wrapper) as one trainable module."""

    def __init__(self, model: nn.Module, blank_image_inputs: Dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self._blank = blank_image_inputs
        self._pending = False
        self._blank_out: Optional[torch.Tensor] = None
        self.model.get_input_embeddings().register_forward_hook(self._after_embedding)
        # counted here, before any sharding empties the parameters
        self._n_params = sum(p.numel() for p in model.parameters())
        self._n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def _base(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _after_embedding(self, module, args, output):
        if not self._pending:
            return
        self._pending = False
        vision_dtype = next(p.dtype for n, p in self._base().named_parameters() if "vis" in n)
        blank = {
            k: (v.to(output.device, vision_dtype) if v.is_floating_point() else v.to(output.device))
            for k, v in self._blank.items()
        }
        self._blank_out = _tensor_sum(self._base().get_image_features(**blank))

    def _inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        dev = self.model.get_input_embeddings().weight.device
        dtype = next(p.dtype for p in self.parameters() if p.is_floating_point())
        out = {
            k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev))
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k != "labels"
        }
        self._pending = "pixel_values" not in out
        self._blank_out = None
        return out

    def forward(
        self,
        batch: Dict[str, torch.Tensor],
        generate: Optional[Dict[str, Any]] = None,
        adapter: Optional[str] = None,
    ):
        """Answer-token losses (through one named LoRA adapter, if given); with `generate`
        (generation kwargs), the new tokens instead."""
        with use_adapter(self.model, adapter):
            if generate is not None:
                return self.generate(batch, **generate)
            return self._losses(batch)

    def _losses(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = self._inputs(batch)
        logits = self.model(**inputs).logits
        labels = batch["labels"].to(logits.device)[:, 1:]
        pick = labels != -100
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1][pick].float(), labels[pick], reduction="none"
        )
        per_token = torch.zeros(labels.shape, dtype=ce.dtype, device=ce.device).masked_scatter(
            pick, ce
        )
        counts = pick.sum(1).clamp(min=1)
        per_sample = per_token.sum(1) / counts
        loss_sum = ce.sum()
        if self._blank_out is not None:  # keeps the vision tower in the graph on text-only batches
            loss_sum = loss_sum + 0.0 * self._blank_out
        tokens = int(pick.sum())
        return {
            "loss": loss_sum / max(1, tokens),
            "loss_sum": loss_sum,
            "per_sample": per_sample.detach(),
            "nll_sum": per_token.sum(1).detach(),
            "tokens": tokens,
            "flops": self.train_flops(int(inputs["attention_mask"].sum())),
        }

    def train_flops(self, tokens: int) -> float:
        """Approximate FLOPs of a training step over `tokens` sequence positions (text and image
        placeholders): 2 per parameter per token forward, 2 more for the activation gradients, and 2
        more for the weight gradients of what trains (all of it, or a LoRA adapter's few)."""
        return float(tokens) * (4 * self._n_params + 2 * self._n_trained)

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        inputs = self._inputs(batch)
        out = self.model.generate(**inputs, **kwargs)
        return out[:, inputs["input_ids"].shape[1] :]


def blank_image_inputs(processor) -> Dict[str, torch.Tensor]:
    """The vision inputs of one small blank image, for text-only batches."""
    from PIL import Image

    enc = processor.image_processor(images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def lora_config(lora: LoraSection):
    from peft import LoraConfig

    targets: Any = list(lora.target_modules)
    if lora.language_only:  # a regex peft matches against the full module name
        targets = rf"^(?!.*(visual|vision))(.*\.)?({'|'.join(targets)})$"
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
    )


def load_model(
    path: str,
    lora: LoraSection,
    adapters: Sequence[str] = ("default",),
    init_from: Optional[str] = None,
) -> nn.Module:
    """The image-text-to-text model: fully trainable (`lora.enabled` false), or frozen with one
    trainable LoRA adapter per name in `adapters` (KDSL's decoupled post-training gives each task its
    own, so no weight update is shared across tasks). `init_from`: saved adapters to start from."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    if not lora.enabled:
        return model.requires_grad_(True)
    model.requires_grad_(False)
    if init_from:

        def where(
            name: str,
        ) -> str:  # peft saves a non-default adapter in a sub-directory of its name
            sub = Path(init_from) / name
            if (sub / "adapter_config.json").is_file():
                return str(sub)
            if (Path(init_from) / "adapter_config.json").is_file():
                return init_from
            raise FileNotFoundError(
                f"recipe.init_from={init_from}: no adapter for '{name}' (adapter_config.json)"
            )

        model = PeftModel.from_pretrained(
            model, where(adapters[0]), adapter_name=adapters[0], is_trainable=True
        )
        for name in adapters[1:]:
            model.load_adapter(where(name), adapter_name=name, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(lora), adapter_name=adapters[0])
        for name in adapters[1:]:
            model.add_adapter(name, lora_config(lora))
    for n, p in model.named_parameters():  # peft leaves only the active adapter trainable
        if "lora_" in n:
            p.requires_grad_(True)
    return model


class use_adapter:
    """Route a peft model through one adapter without touching `requires_grad` (peft's
    `set_adapter` flips it, which an optimizer or DeepSpeed set up earlier would not follow)."""

    def __init__(self, model: nn.Module, name: Optional[str]):
        self.model, self.name, self.saved = model, name, []

    def __enter__(self):
        if self.name is None:
            return self
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in self.model.modules():
            if isinstance(m, BaseTunerLayer):
                self.saved.append((m, m._active_adapter))
                m._active_adapter = [self.name]
        return self

    def __exit__(self, *exc):
        for m, active in self.saved:
            m._active_adapter = active
        self.saved = []
