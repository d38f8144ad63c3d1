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
from mmtrain.models.packing import per_sample_sums, plan_rows, restarting_positions
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
    pack_tokens: int = 0,
) -> Dict[str, torch.Tensor]:
    """Per-sample prompts (+ answer ids) -> one batch. Token-aligned inputs (ids, mask, token
    types) are extended with the answer and padded; the rest (pixels, grids) concatenated.
    `scored` (0/1 per answer token) marks the tokens `MLLM.losses` reports per sample apart
    ("per_sample_scored"), e.g. the answer without its chat-template tokens.

    `pack_tokens` > 0: the samples are packed into rows of at most that many tokens
    (`models/packing.py`) instead of each padded to the longest; the batch then has no attention
    mask but `sample_index` (the sample of each token, -1 on padding) and `image_counts` (each
    sample's images), from which `MLLM.losses` confines attention to each sample."""
    seqs, extras = [], []
    for i, p in enumerate(prompts):
        ans = list(answers[i]) if answers is not None else []
        row, extra = _sequence(p, ans, scored[i] if scored is not None else None)
        seqs.append(row)
        extras.append(extra)
    if pack_tokens:
        return _packed(seqs, extras, pad_id, pack_tokens, answers is not None)
    width = max(len(r["input_ids"]) for r in seqs)
    out = {k: torch.stack([_pad(r[k], width, k, pad_id, left_pad) for r in seqs]) for k in seqs[0]}
    out.update(_joined(extras, range(len(extras))))
    if answers is None:
        out.pop("labels")
    return out


def _sequence(p: Dict[str, torch.Tensor], ans: List[int], scored: Optional[List[int]]):
    """One sample's token-aligned rows (prompt and answer) and its other inputs (pixels, grids)."""
    n = p["input_ids"].shape[-1]
    row = {
        "input_ids": torch.cat([p["input_ids"][0], torch.tensor(ans, dtype=torch.long)]),
        "attention_mask": torch.ones(n + len(ans), dtype=torch.long),
        "labels": torch.tensor([-100] * n + ans, dtype=torch.long),
    }
    if scored is not None:
        row["scored"] = torch.tensor([0] * n + list(scored), dtype=torch.long)
    extra = {}
    for k, v in p.items():
        if k in ("input_ids", "attention_mask"):
            continue
        if v.dim() == 2 and v.shape == p["input_ids"].shape:  # token-aligned (mm_token_type_ids)
            row[k] = torch.cat([v[0], torch.zeros(len(ans), dtype=v.dtype)])
        else:
            extra[k] = v
    return row, extra


def _joined(extras: List[Dict[str, torch.Tensor]], order) -> Dict[str, torch.Tensor]:
    """The samples' other inputs (pixels, grids; a text-only sample has none), concatenated in
    `order`."""
    keys = list(dict.fromkeys(k for e in extras for k in e))
    return {k: torch.cat([extras[i][k] for i in order if k in extras[i]]) for k in keys}


FILL = {"input_ids": None, "attention_mask": 0, "labels": -100, "sample_index": -1}


def _pad(t: torch.Tensor, width: int, key: str, pad_id: int, left: bool = False) -> torch.Tensor:
    fill = FILL.get(key, 0)
    pad = torch.full((width - len(t),), pad_id if fill is None else fill, dtype=t.dtype)
    return torch.cat([pad, t]) if left else torch.cat([t, pad])


def _packed(seqs, extras, pad_id: int, budget: int, with_labels: bool) -> Dict[str, torch.Tensor]:
    """The samples packed into rows (`packing.plan_rows`); the other inputs (pixels, grids) in
    the order their samples now come, row after row."""
    plan = plan_rows([len(r["input_ids"]) for r in seqs], budget)
    keys = [k for k in seqs[0] if k != "attention_mask"]
    rows = []
    for members in plan:
        row = {k: torch.cat([seqs[i][k] for i in members]) for k in keys}
        row["sample_index"] = torch.cat(
            [torch.full((len(seqs[i]["input_ids"]),), i, dtype=torch.long) for i in members]
        )
        rows.append(row)
    width = max(len(r["input_ids"]) for r in rows)
    out = {k: torch.stack([_pad(r[k], width, k, pad_id) for r in rows]) for k in rows[0]}
    out.update(_joined(extras, [i for members in plan for i in members]))
    if "image_grid_thw" in out:
        out["image_counts"] = torch.tensor([len(e.get("image_grid_thw", ())) for e in extras])
    if not with_labels:
        out.pop("labels")
    return out


HOST_ONLY = ("labels", "scored", "sample_index", "image_counts")  # read here, not by the model


def _segments(index: torch.Tensor):
    """(row, start, end, sample) of every sample in a packed batch's `sample_index`."""
    for r, row in enumerate(index.numpy().tolist()):  # a host tensor (numpy: no device read)
        start = 0
        for j in range(1, len(row) + 1):
            if j == len(row) or row[j] != row[start]:
                if row[start] >= 0:
                    yield r, start, j, row[start]
                start = j


class _PerSample:
    """Per-sample sums of per-token values (labels' positions from `first` on): over each row of a
    padded batch, over each sample's tokens of a packed one (`sample_index`)."""

    def __init__(self, batch: Dict[str, torch.Tensor], first: int, device: torch.device):
        index = batch.get("sample_index")
        self.index = None if index is None else index[:, 1 + first :].to(device)
        self.n = 0 if index is None else int(index.numpy().max()) + 1  # host tensors
        real = batch["attention_mask"] if index is None else (index >= 0)
        self.positions = int(real.numpy().sum())  # the tokens the model reads (host tensors)

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return values.sum(1)
        return per_sample_sums(values, self.index, self.n)


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
        inputs = {
            k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev))
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k not in HOST_ONLY
        }
        if "sample_index" in batch:  # packed: attention confined to each sample by its positions
            inputs["position_ids"] = self.packed_positions(batch).to(dev)
            inputs["use_cache"] = False  # (transformers reads packing only without a cache)
        return inputs

    def packed_positions(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Positions that restart at every sample of a packed batch: (rows, positions), or for a
        multimodal-rotary model (Qwen2-VL) (4, rows, positions), the text positions first, then
        each sample's own M-RoPE positions, computed as for the sample alone."""
        index = batch["sample_index"]
        text = restarting_positions(index)
        rope_index = getattr(getattr(self.base_model(), "model", None), "get_rope_index", None)
        if rope_index is None:
            return text
        rope = text[None].repeat(3, 1, 1)
        grids, counts = batch.get("image_grid_thw"), batch.get("image_counts")
        counts = counts.numpy().tolist() if counts is not None else None  # host tensors
        taken = 0
        for r, a, b, sample in _segments(index):
            n = counts[sample] if counts is not None else 0
            if n:  # text-only samples keep their text positions in all three
                rope[:, r, a:b] = rope_index(
                    batch["input_ids"][r : r + 1, a:b],
                    mm_token_type_ids=batch["mm_token_type_ids"][r : r + 1, a:b],
                    image_grid_thw=grids[taken : taken + n],
                )[0][:, 0]
                taken += n
        return torch.cat([text[None], rope])

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
        loss_sum = ce.sum()
        tokens = pick.sum()  # on the device, like the losses
        per_sample = _PerSample(batch, first, per_token.device)
        nll = per_sample.sums(per_token)
        out = {
            "loss": loss_sum / tokens.clamp(min=1),
            "loss_sum": loss_sum,
            "per_sample": (nll / per_sample.sums(pick.to(ce.dtype)).clamp(min=1)).detach(),
            "nll_sum": nll.detach(),
            "tokens": tokens,
            "flops": self.train_flops(per_sample.positions),
        }
        if "scored" in batch:
            scored = batch["scored"].to(per_token.device)[:, 1 + first :].to(per_token.dtype)
            out["per_sample_scored"] = (
                per_sample.sums(per_token * scored) / per_sample.sums(scored).clamp(min=1)
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
