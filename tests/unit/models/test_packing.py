"""Sequence packing (models/packing.py, `collate_sequences(pack_tokens=...)`): the rows' plan,
positions restarting per sample, and a packed batch's losses and gradients equal to the padded
batch's, for Qwen2-VL (multimodal rotary positions per sample) and Llava, images and text-only
samples mixed."""

from __future__ import annotations

import pytest
import torch

from mmtrain.models.packing import padding_share, plan_rows, restarting_positions


def test_rows_hold_at_most_the_budget_and_every_sample_once():
    lengths = [300, 20, 150, 410, 90, 60, 10]
    rows = plan_rows(lengths, 400)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 400 for r in rows if len(r) > 1)
    assert [3] in rows  # longer than the budget: a row of its own
    assert all(r == sorted(r) for r in rows)
    assert len(rows) == 3  # 410 | 300 90 10 | 150 20 60


def test_positions_restart_at_every_sample_and_at_the_padding():
    index = torch.tensor([[0, 0, 0, 2, 2, -1, -1], [1, 1, 1, 1, 1, 1, 1]])
    assert restarting_positions(index).tolist() == [[0, 1, 2, 0, 1, 0, 1], list(range(7))]


def _samples(kind, tmp_path):
    from PIL import Image

    from mmtrain.models.mllm import Prompter, load_processor
    from mmtrain_testing.tiny import make_tiny_vlm

    d = make_tiny_vlm(str(tmp_path / kind), kind)
    proc = load_processor(str(d))
    pr = Prompter(proc)
    words = "circle red art blue square left right small large".split()
    prompts, answers, scored = [], [], []
    for i, n in enumerate([3, 40, 12, 25, 7]):  # answers of 3 to 40 words
        image = Image.new("RGB", (120 + 40 * i, 90), (40 * i, 90, 200)) if i % 2 == 0 else None
        prompts.append(pr.encode_prompt(f"post {i} : {' '.join(words[: i + 2])}", image))
        answers.append(pr.encode_answer("; ".join(words[j % len(words)] for j in range(n))))
        scored.append([int(j % 3 != 0) for j in range(len(answers[-1]))])
    return d, proc, prompts, answers, scored


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_a_packed_batch_has_the_padded_batchs_losses_and_gradients(kind, tmp_path):
    """fp32, the same samples padded and packed: the losses, each sample's, and every gradient
    agree to 1e-6 relative (measured: 3e-7; the sums run over the same tokens in another order,
    attention over padding is masked in one and absent in the other). Wrong positions for the
    images (next test) move the image samples' losses by 4e-6 to 2e-5."""
    from mmtrain.models.lora import LoraSection
    from mmtrain.models.mllm import MLLM, collate_sequences, load_model

    d, proc, prompts, answers, scored = _samples(kind, tmp_path)
    pad = proc.tokenizer.pad_token_id
    lengths = [p["input_ids"].shape[1] + len(a) for p, a in zip(prompts, answers)]
    budget = max(lengths) + 10
    padded = collate_sequences(prompts, answers, pad, scored=scored)
    packed = collate_sequences(prompts, answers, pad, scored=scored, pack_tokens=budget)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows
    assert padding_share(packed) < padding_share(padded) / 2
    torch.manual_seed(0)
    model = MLLM(load_model(str(d), LoraSection(enabled=False)))
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        out = model("losses", batch)
        out["loss_sum"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert int(a["tokens"]) == int(b["tokens"]) and a["flops"] == b["flops"]
    for k in ("loss_sum", "per_sample", "nll_sum", "per_sample_scored"):
        assert b[k].tolist() == pytest.approx(a[k].tolist(), rel=1e-6), k
    assert ga.keys() == gb.keys() and len(ga) > 10
    # relative to each tensor's largest entry; a gradient that is zero in exact arithmetic (the
    # attention keys' biases: softmax ignores a constant per query) only to the model's largest
    top = max(g.abs().max().item() for g in ga.values())
    worst = max(
        (ga[n] - gb[n]).abs().max().item() / max(ga[n].abs().max().item(), 1e-4 * top) for n in ga
    )
    print(f"{kind}: largest gradient difference {worst:.2e} of the tensor's largest entry")
    assert worst <= 1e-5


def test_packing_without_its_positions_would_let_samples_attend_to_each_other(tmp_path):
    """The test above can fail: the packed rows read as one sequence (no restarting positions)
    give other losses."""
    from mmtrain.models.lora import LoraSection
    from mmtrain.models.mllm import MLLM, collate_sequences, load_model

    d, proc, prompts, answers, _ = _samples("qwen2_vl", tmp_path)
    pad = proc.tokenizer.pad_token_id
    padded = collate_sequences(prompts, answers, pad)
    packed = collate_sequences(prompts, answers, pad, pack_tokens=10_000)  # one row
    model = MLLM(load_model(str(d), LoraSection(enabled=False)))
    with torch.no_grad():
        want = model("losses", padded)["per_sample"]
        model.packed_positions = lambda batch: torch.arange(batch["input_ids"].shape[1])[None]
        got = model("losses", packed)["per_sample"]
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-4)  # the first sees nothing else
    assert got[1:].tolist() != pytest.approx(want[1:].tolist(), rel=1e-3)


def test_each_packed_image_sample_needs_its_own_multimodal_rotary_positions(tmp_path):
    """Attention confined to each sample but M-RoPE replaced by text positions: the samples with
    an image (0, 2, 4) change, the text-only ones do not; so the equality above checks the
    per-sample M-RoPE positions too."""
    from mmtrain.models.lora import LoraSection
    from mmtrain.models.mllm import MLLM, collate_sequences, load_model

    d, proc, prompts, answers, _ = _samples("qwen2_vl", tmp_path)
    pad = proc.tokenizer.pad_token_id
    padded = collate_sequences(prompts, answers, pad)
    packed = collate_sequences(prompts, answers, pad, pack_tokens=10_000)
    model = MLLM(load_model(str(d), LoraSection(enabled=False)))
    with torch.no_grad():
        want = model("losses", padded)["per_sample"].tolist()
        model.packed_positions = lambda b: restarting_positions(b["sample_index"])[None].repeat(
            4, 1, 1
        )
        got = model("losses", packed)["per_sample"].tolist()
    for i in (1, 3):
        assert got[i] == pytest.approx(want[i], rel=1e-6)
    for i in (0, 2, 4):  # measured: 1.5e-5, 4e-6, 1.6e-5
        assert got[i] != pytest.approx(want[i], rel=2e-6)


def test_vikdf_language_losses_packed_equal_padded_with_soft_prompts_and_their_gradients():
    """FuseModel._lm_loss (VIKDF dialogue and fusion) with `pack_tokens`: token ids and soft
    prompts (tensors that train) packed; the CE sum, its count, each sample's NLL and the
    gradients of the LLM and of the soft prompts equal the padded batch's (fp32, 1e-6 / 1e-5)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmtrain.models.fuse import FuseModel

    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    soft = torch.randn(4, 6, 64, generator=g, requires_grad=True)
    lengths = [(5, 40), (12, 3), (30, 18), (3, 9)]  # (context, target) tokens
    prefix = [[1, 5, 7]] * 4
    middle = [torch.randint(3, 97, (n,), generator=g).tolist() for n, _ in lengths]
    target = [torch.randint(3, 97, (n,), generator=g).tolist() + [2] for _, n in lengths]
    results = []
    for pack in (0, 64):
        model = FuseModel(None, llm, pad_id=0, eos_id=2, pack_tokens=pack)
        llm.zero_grad()
        soft.grad = None
        parts = [[p, s, m, t] for p, s, m, t in zip(prefix, soft, middle, target)]
        out = model._lm_loss(parts, 3, target)
        out["ce_sum"].backward()
        grads = {n: p.grad.clone() for n, p in llm.named_parameters()}
        results.append((out, grads, soft.grad.clone()))
    (a, ga, sa), (b, gb, sb) = results
    assert int(a["ce_count"]) == int(b["ce_count"]) == sum(len(t) for t in target)
    assert b["ce_sum"].item() == pytest.approx(a["ce_sum"].item(), rel=1e-6)
    assert b["nll"].tolist() == pytest.approx(a["nll"].tolist(), rel=1e-6)
    assert torch.allclose(sa, sb, rtol=1e-5, atol=1e-7)
    top = max(g.abs().max().item() for g in ga.values())
    for n in ga:
        assert (ga[n] - gb[n]).abs().max().item() <= 1e-5 * max(
            ga[n].abs().max().item(), 1e-4 * top
        ), n
