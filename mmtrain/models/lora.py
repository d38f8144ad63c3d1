"""LoRA through peft, one way for every recipe: `LoraSection` (the config) and `apply_lora`.

A recipe that adapts a transformers model (the toy LM, BVIF's LLM, a VLM) calls
`apply_lora(model, cfg.lora)`; KDSL's decoupled post-training passes one adapter name per task
(no weight update shared across tasks) and `use_adapter` routes a forward through one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from torch import nn


@dataclass
class LoraSection:
    """A peft LoRA adapter, shared by every recipe that adapts a transformers model."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # image-text models: adapt the language model only, never the vision tower
    language_only: bool = True


def _has_vision(model: nn.Module) -> bool:
    return any("visual" in n or "vision" in n for n, _ in model.named_modules())


def lora_config(lora: LoraSection, model: nn.Module):
    """peft's LoraConfig for `model`: the target modules by name, or for an image-text model with
    `language_only`, a regex (peft matches it against the full module name) that skips the tower."""
    from peft import LoraConfig

    targets: Any = list(lora.target_modules)
    if lora.language_only and _has_vision(model):
        targets = rf"^(?!.*(visual|vision))(.*\.)?({'|'.join(targets)})$"
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
    )


def _saved_adapter(init_from: str, name: str) -> str:
    """Where peft saved adapter `name`: a sub-directory of its name, or (one adapter) the top."""
    sub = Path(init_from) / name
    if (sub / "adapter_config.json").is_file():
        return str(sub)
    if (Path(init_from) / "adapter_config.json").is_file():
        return init_from
    raise FileNotFoundError(
        f"recipe.init_from={init_from}: no adapter for '{name}' (adapter_config.json)"
    )


def apply_lora(
    model: nn.Module,
    lora: LoraSection,
    adapters: Sequence[str] = ("default",),
    init_from: Optional[str] = None,
) -> nn.Module:
    """`model` frozen, with one trainable LoRA adapter per name in `adapters` (new, or loaded from
    `init_from`); `model` unchanged when `lora.enabled` is false."""
    from peft import PeftModel, get_peft_model

    if not lora.enabled:
        return model
    model.requires_grad_(False)
    if init_from:
        first = _saved_adapter(init_from, adapters[0])
        model = PeftModel.from_pretrained(model, first, adapter_name=adapters[0], is_trainable=True)
        for name in adapters[1:]:
            model.load_adapter(
                _saved_adapter(init_from, name), adapter_name=name, is_trainable=True
            )
    else:
        config = lora_config(lora, model)
        model = get_peft_model(model, config, adapter_name=adapters[0])
        for name in adapters[1:]:
            model.add_adapter(name, lora_config(lora, model))
    for n, p in model.named_parameters():  # peft leaves only the active adapter trainable
        if "lora_" in n:
            p.requires_grad_(True)
    return model


class use_adapter:
    """Route a peft model through one adapter without touching `requires_grad` (peft's
    `set_adapter` flips it, which an optimizer or DeepSpeed set up earlier would not follow)."""

    def __init__(self, model: nn.Module, name: Optional[str]):
        self.model = model
        self.name = name
        self.saved = []

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
