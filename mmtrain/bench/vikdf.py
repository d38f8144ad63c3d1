"""`mmtrain bench vikdf-stage1|vikdf-fusion`: throughput and MFU of VIKDF steps at the published size.

vikdf-fusion: one BVIF fusion step (both directions: the LLM reads instruction + text +
placeholders for the prior, then instruction + soft prompts + text for the caption CE) with a
frozen Llama-2-7B-shaped LLM replicated in bf16 (not sharded: it fits on the GPU, so ZeRO-3
would only add gathers), the IQ-Former and BVIF heads trained; tokens/s counts every token the
LLM processes. The baseline's stage-2 step (one LLM pass: 32 soft prompts + 128 text tokens)
runs beside it with --baseline.

vikdf-stage1:

Random weights, bf16, one GPU: frozen CLIP ViT-L/14 (224 px) and text towers (clean and masked
inputs each), the 12-layer IQ-Former forward and backward twice, the TIM/TA-MIM/IA-MTM heads,
fused AdamW. FLOPs are counted by torch's FlopCounterMode, MFU against the 989 TFLOP/s dense bf16
spec, like the peer baseline. With --baseline PATH (../shared/baselines/hf_eager_vikdf.py), the
plain HF-eager composition runs in the same process and a last JSON line gives the ratio.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import time
from typing import Optional

import torch

PEAK = 989e12


def _measure(step, iters: int, warm: int, cuda: bool):
    """(seconds per step, FLOPs of one step, peak GiB): one step to compile outside the counted
    and timed ones, one under torch's FLOP counter, then `warm` + `iters` timed."""
    from torch.utils.flop_counter import FlopCounterMode

    step()
    with FlopCounterMode(display=False) as fc:
        step()
    s, gib = _time(step, iters, warm, cuda)
    return s, fc.get_total_flops(), gib


def _time(step, iters: int, warm: int, cuda: bool):
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warm):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - t) / iters, (
        torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    )


# (vision width, layers, heads, image, patch) (text width, layers, heads) (IQ-Former width, layers,
# heads) vocab
SIZES = {
    "published": ((1024, 24, 16, 224, 14), (768, 12, 12), (768, 12, 12), 49408),
    "tiny": ((64, 2, 4, 32, 8), (64, 2, 4), (64, 2, 4), 100),
}


def _frozen_towers(size: str, dev, dt):
    """CLIP vision and text towers of `size`, frozen, on `dev` in `dt`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    (vw, vl, vh, img, patch), (tw, tl, th), _, vocab = SIZES[size]
    vision = (
        CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=vw,
                intermediate_size=4 * vw,
                num_hidden_layers=vl,
                num_attention_heads=vh,
                image_size=img,
                patch_size=patch,
            ),
        )
        .to(dev, dt)
        .eval()
        .requires_grad_(False)
    )
    text = (
        CLIPTextModel(
            CLIPTextConfig(
                hidden_size=tw,
                intermediate_size=4 * tw,
                num_hidden_layers=tl,
                num_attention_heads=th,
                max_position_embeddings=77,
                vocab_size=vocab,
            ),
        )
        .to(dev, dt)
        .eval()
        .requires_grad_(False)
    )
    return vision, text


def _stage1_batch(b: int, size: str, dev, dt):
    """Random images (clean, masked), their scored patches, captions and IA-MTM labels."""
    (_, _, _, img, patch), _, _, vocab = SIZES[size]
    grid = img // patch
    pixels = torch.randn(b, 3, img, img, device=dev, dtype=dt)
    scored = torch.rand(b, grid, grid, device=dev) < 0.6
    masked = pixels * (~scored).repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None]
    ids = torch.randint(0, vocab, (b, 77), device=dev)
    attn = torch.ones_like(ids)
    labels = torch.where(torch.rand(b, 77, device=dev) < 0.15, ids, torch.full_like(ids, -100))
    return pixels, masked, scored, ids, attn, labels


def _stage1_model(size: str, dev, dt):
    """The IQ-Former and the stage-1 heads (what trains), at `size`."""
    from mmtrain.models.distill_heads import Stage1Model
    from mmtrain.models.iqformer import IQFormer, IQFormerConfig

    (vw, _, _, img, patch), (tw, _, _), (w, layers, heads), vocab = SIZES[size]
    grid = img // patch
    iq = IQFormer(
        IQFormerConfig(
            width=w,
            layers=layers,
            heads=heads,
            intermediate=4 * w,
            num_queries=32,
            cross_attention_every=2,
            vision_width=vw,
            text_width=tw,
        )
    )
    return Stage1Model(
        iq, patch=patch, grid=grid, vocab=vocab, tim_dim=256, heads=heads, tim_global=False
    ).to(dev, dt)


def stage1(
    batch: int = 128,
    iters: int = 5,
    warm: int = 2,
    compile_towers: bool = True,
    size: str = "published",
    device: str = "cuda",
) -> dict:
    cuda = device == "cuda"
    dev, dt = torch.device(device), torch.bfloat16 if cuda else torch.float32
    vision, text = _frozen_towers(size, dev, dt)
    model = _stage1_model(size, dev, dt)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    enc_img = torch.compile(vision) if compile_towers else vision
    enc_txt = torch.compile(text) if compile_towers else text
    b = batch
    pixels, masked, scored, ids, attn, labels = _stage1_batch(b, size, dev, dt)

    def step():
        with torch.no_grad():
            vi = enc_img(pixel_values=pixels).last_hidden_state
            vm = enc_img(pixel_values=masked).last_hidden_state
            ti = enc_txt(input_ids=ids, attention_mask=attn).last_hidden_state
            tm = enc_txt(input_ids=ids, attention_mask=attn).last_hidden_state
        out = model(
            "losses",
            vi,
            ti,
            attn,
            masked_image_states=vm,
            masked_text_states=tm,
            pixels=pixels,
            scored=scored,
            mtm_labels=labels,
        )
        (0.5 * out["tim"] + 0.2 * out["mim"] + 0.2 * out["mtm"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s, flops, gib = _measure(step, iters, warm, cuda)
    return {
        "kind": "stage1_mmtrain",
        "size": size,
        "device": device,
        "B": b,
        "compiled_towers": compile_towers,
        "step_ms": round(s * 1e3, 1),
        "samples_s": round(b / s),
        "tflops": round(flops / s / 1e12, 1),
        "mfu_vs_989": round(flops / s / PEAK, 3),
        "gflop_per_sample": round(flops / b / 1e9, 1),
        "peak_gib": round(gib, 1),
    }


def _frozen_llm(size: str, dev, dt):
    """A Llama-2-7B-shaped (or tiny) causal LM, frozen, and (its width, vocabulary, the
    IQ-Former's width and queries)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d, layers, heads, ffn, vocab, w, q = (
        (4096, 32, 32, 11008, 32000, 768, 32)
        if size == "published"
        else (64, 2, 4, 128, 100, 64, 8)
    )
    with dev:
        llm = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=d,
                intermediate_size=ffn,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                vocab_size=vocab,
            )
        )
    llm = llm.to(dt).eval().requires_grad_(False)
    return llm, (d, vocab, w, q)


def _fusion_model(llm, size: str, d: int, w: int, q: int, dev, dt):
    """BVIF around the frozen LLM (replicated, as the recipe runs it without LoRA)."""
    from mmtrain.models.bvif import BVIF
    from mmtrain.models.fuse import FuseModel
    from mmtrain.models.iqformer import IQFormer, IQFormerConfig
    from mmtrain.parallelize import replicate_frozen

    iq = IQFormer(
        IQFormerConfig(
            width=w,
            layers=12 if size == "published" else 2,
            heads=12 if size == "published" else 4,
            intermediate=4 * w,
            num_queries=q,
            vision_width=1024 if size == "published" else 64,
            text_width=w,
        )
    )
    model = FuseModel(BVIF(iq, d, variational=True), llm, pad_id=0, eos_id=2)
    return replicate_frozen(model, "llm").to(dev, dt)


def fusion(
    batch: int = 8,
    text_len: int = 128,
    iters: int = 5,
    warm: int = 2,
    size: str = "published",
    device: str = "cuda",
    compile_llm: bool = False,
) -> dict:
    from mmtrain.models.fuse import Knowledge

    cuda = device == "cuda"
    dev, dt = torch.device(device), torch.bfloat16 if cuda else torch.float32
    llm, (d, vocab, w, q) = _frozen_llm(size, dev, dt)
    model = _fusion_model(llm, size, d, w, q, dev, dt)
    iq = model.bvif.iqformer
    if compile_llm:
        model.llm.forward = torch.compile(model.llm.forward)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    g = torch.Generator().manual_seed(0)
    text = [torch.randint(3, vocab, (text_len,), generator=g).tolist() for _ in range(batch)]
    instr = [[1] + torch.randint(3, vocab, (8,), generator=g).tolist() for _ in range(batch)]
    image_states = torch.randn(
        batch, 257 if size == "published" else 17, iq.config.vision_width, device=dev, dtype=dt
    )
    seen, target = Knowledge(image_states=image_states), [t + [2] for t in text]

    def step():  # the image's knowledge, as the peer
        out = model("fusion_losses", seen, text, instr, target, instr, "image")
        (out["ce"] + 0.5 * out["recon"] + 0.1 * out["kl"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s, flops, gib = _measure(step, iters, warm, cuda)
    tokens = batch * ((9 + text_len + q) + (9 + q + text_len + 1))  # both LLM passes
    return {
        "kind": "fusion_mmtrain_frozen_llm_replicated",
        "size": size,
        "B": batch,
        "llm_tokens_per_step": tokens,
        "step_ms": round(s * 1e3, 1),
        "samples_s": round(batch / s, 1),
        "tok_s": round(tokens / s),
        "tflops": round(flops / s / 1e12, 2),
        "mfu_vs_989": round(flops / s / PEAK, 3),
        "peak_gib": round(gib, 1),
        "compiled_llm": compile_llm,
    }


def _baseline(path: str, part: str, *args) -> dict:
    spec = importlib.util.spec_from_file_location("hf_eager_vikdf", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        getattr(mod, part)(*args)
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def _side_by_side(
    kind: str,
    ours_fn,
    part: str,
    batch: int,
    baseline: Optional[str],
    rate: str,
    target: float,
    note: Optional[str] = None,
) -> int:
    """Our step, then (with `baseline`) the peer's step `part` in the same process, then their ratio."""
    if not torch.cuda.is_available():
        print(json.dumps({"kind": kind, "skipped": "needs a CUDA GPU (published-size step)"}))
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    ours = ours_fn()
    print(json.dumps(ours), flush=True)
    if baseline:
        torch.cuda.empty_cache()
        peer = _baseline(baseline, part, batch)
        peer.setdefault("samples_s", round(peer["B"] / (peer["step_ms"] / 1e3), 1))
        print(json.dumps(peer), flush=True)
        ratio = {
            f"ratio_{rate}_mmtrain_over_hf_eager": round(ours[rate] / peer[rate], 3),
            "target": target,
        }
        print(json.dumps({**ratio, **({"note": note} if note else {})}))
    return 0


def main_fusion(batch: int = 8, compile_llm: bool = False, baseline: Optional[str] = None) -> int:
    return _side_by_side(
        "fusion_mmtrain",
        lambda: fusion(batch, compile_llm=compile_llm),
        "stage2",
        batch,
        baseline,
        "samples_s",
        1.3,
        "samples/s: mmtrain's step runs both BVIF directions (two LLM passes), the peer's one",
    )


def main(batch: int = 128, compile_towers: bool = True, baseline: Optional[str] = None) -> int:
    return _side_by_side(
        "stage1_mmtrain",
        lambda: stage1(batch, compile_towers=compile_towers),
        "stage1",
        batch,
        baseline,
        "samples_s",
        1.5,
    )
