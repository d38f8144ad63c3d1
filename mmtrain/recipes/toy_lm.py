"""A tiny causal LM on generated token data: exercises the engine end to end on a CPU.

Each sequence is an arithmetic progression modulo the vocabulary (`start + k * stride`), so
the loss falls quickly once the model reads the first two tokens; the stream is a pure
function of (seed, split, sample index), which makes exact resume testable. The LM is any
local HF causal-LM directory (`model_path`) or a Llama built from the sizes below, optionally
wrapped in a peft LoRA adapter.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.models.lora import LoraSection, apply_lora
from mmtrain.parallelize import numel
from mmtrain.recipes.base import EvalResult, Recipe, StepOutput, stop_if_requested
from mmtrain.recipes.common import gather_rows
from mmtrain.schema import RecipeConfig, path_field


@dataclass
class ToyLMConfig(RecipeConfig):
    name: str = "toy_lm"
    # local HF causal-LM dir; unset: built from sizes below
    model_path: Optional[str] = path_field()
    vocab_size: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 32
    dropout: float = 0.0
    freeze_embeddings: bool = False
    lora: LoraSection = field(default_factory=LoraSection)
    eval_batches: int = (
        4  # validation: the first eval_batches x micro_batch_size samples, any world
    )
    # for fault tests: NaN loss at these micro-steps
    inject_nan_at_calls: List[int] = field(default_factory=list)
    # for timing tests: each micro-batch also waits this long (a model slow enough that a run
    # spans a signal however fast the machine)
    step_delay_s: float = 0.0


class TokenStream:
    """Deterministic batches of arithmetic sequences; this rank's slice of a global stream. Optimizer
    step s holds samples s*G .. (s+1)*G - 1 (G = batch x grad_accum x world) whatever the world size."""

    def __init__(
        self,
        cfg: ToyLMConfig,
        seed: int,
        rank: int,
        world: int,
        batch: int,
        split: str = "train",
        grad_accum: int = 1,
    ):
        self.cfg, self.rank, self.world, self.batch, self.grad_accum = (
            cfg,
            rank,
            world,
            batch,
            grad_accum,
        )
        self.base_seed = seed * 1_000_003 + (0 if split == "train" else 7_777_777_777)
        self.position = 0  # batches this rank has taken
        self.epoch = 0  # an endless stream: one epoch

    def sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.base_seed + index)
        start = torch.randint(self.cfg.vocab_size, (1,), generator=g)
        stride = torch.randint(1, 5, (1,), generator=g)
        return (start + stride * torch.arange(self.cfg.seq_len)) % self.cfg.vocab_size

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        first = (self.position * self.world + self.rank) * self.batch
        self.position += 1
        return {"input_ids": torch.stack([self.sample(first + i) for i in range(self.batch)])}

    def stats(self):
        return {}

    def state_dict(self):
        return {"position": self.position, "grad_accum": self.grad_accum}

    def load_state_dict(self, state):
        self.position = int(state["position"]) // int(state.get("grad_accum", 1)) * self.grad_accum

    def reshard_state(self, states, rank: int, world: int):
        return states[0]  # every rank stood at the same step

    def close(self) -> None:
        pass  # no workers


class ToyLMModel(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.lm(input_ids=input_ids, labels=input_ids)
        return {"lm": out.loss, "logits": out.logits}


def build_causal_lm(cfg: ToyLMConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.model_path:
        return AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=4 * cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=max(64, cfg.seq_len),
            attention_dropout=cfg.dropout,
            tie_word_embeddings=False,
        )
    )


def lm_scores(rows) -> Dict[str, float]:
    """Mean next-token loss and accuracy over every predicted token of the rows."""
    tokens = sum(r["tokens"] for r in rows)
    return {
        "loss": sum(r["nll"] for r in rows) / tokens,
        "accuracy": sum(r["correct"] for r in rows) / tokens,
        "n": len(rows),
    }


class ToyLM(Recipe):
    Config = ToyLMConfig

    def build_model(self) -> nn.Module:
        cfg: ToyLMConfig = self.cfg
        # a checkpoint loads partitioned under ZeRO-3; a model made from its config is built
        # whole (transformers initialises one made under zero.Init otherwise than the seed's
        # plain build, which `mmtrain eval` and export rebuild)
        with self.ctx.partitioned() if cfg.model_path else contextlib.nullcontext():
            lm = build_causal_lm(cfg)
            if cfg.freeze_embeddings:
                lm.get_input_embeddings().requires_grad_(False)
            lm = apply_lora(lm, cfg.lora)
        self._num_params = sum(numel(p) for p in lm.parameters())
        self._calls = 0
        return ToyLMModel(lm)

    def build_data(self) -> TokenStream:
        c = self.ctx
        return TokenStream(
            self.cfg, c.seed, c.rank, c.world_size, c.micro_batch_size, grad_accum=c.grad_accum
        )

    def step(self, model, batch) -> StepOutput:
        ids = batch["input_ids"].to(self.ctx.device)
        out = model(ids)
        self._calls += 1
        if self.cfg.step_delay_s:
            time.sleep(self.cfg.step_delay_s)
        loss = out["lm"]
        if self._calls in self.cfg.inject_nan_at_calls:
            loss = loss * float("nan")
        return StepOutput(losses={"lm": loss}, samples=ids.shape[0], tokens=ids.numel())

    @torch.no_grad()
    def evaluate(self, model, split: str = "val") -> EvalResult:
        """Loss and next-token accuracy over the first `eval_batches` x micro-batch samples of the
        validation stream, whatever the world size: global batch b goes to rank b mod world, a
        rank with fewer batches repeats the last one (every rank runs the same forwards, which a
        ZeRO-3 model needs); the rows are gathered by sample, so a repeat counts once."""
        c, mb, batches = self.ctx, self.ctx.micro_batch_size, self.cfg.eval_batches
        stream = TokenStream(self.cfg, c.seed, 0, 1, mb, split="val")
        rows = []
        for r in range(-(-batches // c.world_size)):
            stop_if_requested(c)
            first = min(r * c.world_size + c.rank, batches - 1) * mb
            ids = torch.stack([stream.sample(first + i) for i in range(mb)]).to(c.device)
            logits, target = model(ids)["logits"][:, :-1].float(), ids[:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
            correct = (logits.argmax(-1) == target).sum(1)
            rows += [
                {"key": f"{first + i:08d}", "nll": x, "tokens": target.shape[1], "correct": k}
                for i, (x, k) in enumerate(zip(nll.tolist(), correct.tolist()))
            ]
        rows = gather_rows(c, rows)
        return EvalResult(lm_scores(rows), rows=rows)

    def flops_per_sample(self) -> float:
        # 6 N per token (forward 2N, backward 4N); LoRA still back-propagates through activations.
        return 6.0 * self._num_params * self.cfg.seq_len
