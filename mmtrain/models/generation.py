"""Free generation settings shared by the recipes that generate (`GenerationSection`), and the
pad id a batch of prompts is padded with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict


@dataclass
class GenerationSection:
    """transformers `generate` settings; greedy or beam search, never sampling."""

    max_new_tokens: int = 64
    num_beams: int = 1
    no_repeat_ngram_size: int = 0  # 0: off

    def kwargs(self) -> Dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "do_sample": False,
        }


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, or its end-of-sequence token when it has none (Llama)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
