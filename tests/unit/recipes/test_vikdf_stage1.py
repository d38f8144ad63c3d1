"""VIKDF stage 1 on tiny random towers and synthetic image-text shards, 2 CPU ranks under ZeRO-3."""

import random
from pathlib import Path

import pytest
import torch

from mmtrain.data.images import ImageTransform
from mmtrain.metrics.retrieval import retrieval_recalls
from mmtrain.models.iqformer import IQFormer, IQFormerConfig, bert_key_to_qformer, init_from_bert
from mmtrain.recipes.vikdf.collate import Pixels, Stage1Collate, block_mask
from mmtrain.recipes.vikdf.stage1 import Stage1Config


def test_block_masks():
    z, s = block_mask(random.Random(0), grid=16, block=2, ratio=0.6, visible=0.2)
    assert s.sum() == round(0.6 * 64) * 4  # 38 blocks of 2x2 scored
    # zeroed is a subset of scored
    assert z.sum() == (38 - int(0.2 * 38)) * 4 and bool((s | ~z).all())
    again, _ = block_mask(random.Random(0), 16, 2, 0.6, 0.2)
    assert torch.equal(z, again)


def test_collate_masks_text_but_not_special_tokens(stage1_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stage1_assets / "tiny" / "clip")
    cfg = Stage1Config(max_text_len=12, mtm_prob=0.5)
    collate = Stage1Collate(tok, cfg, grid=8, patch=8, seed=0)
    items = [
        {
            "key": f"k{i}",
            "meta": {},
            "text": "two red circles on the left",
            "image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8),
        }
        for i in range(6)
    ]
    b = collate(items)
    selected = b.labels != -100
    assert selected.any(1).all()  # every caption has a target
    assert not selected[b.attn == 0].any()  # no padding selected
    specials = torch.isin(b.ids, torch.tensor(tok.all_special_ids))
    assert not selected[specials].any()  # no special token selected
    assert torch.equal(b.labels[selected], b.ids[selected])
    replaced = b.masked_ids != b.ids
    assert (b.masked_ids[replaced] == tok.mask_token_id).all() and not replaced[~selected].any()
    # the images ship once, as uint8, with a bool grid of the patches the masked view zeroes
    assert b.pixels.dtype == torch.uint8 and not hasattr(b, "masked_pixels")
    assert b.zeroed.shape == (6, 8, 8) and b.zeroed.dtype == torch.bool
    assert b.zeroed.any() and not b.zeroed.all()
    # on the device: normalised, and the masked view zero on exactly the zeroed patches
    pixels = Pixels(ImageTransform(resize=64, crop=64), 8, torch.device("cpu"))
    x = pixels(b.pixels)
    masked = pixels.masked(x, b.zeroed)
    want = b.zeroed.repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert torch.equal((masked == 0).all(1), want | (x == 0).all(1))
    assert torch.equal(masked[~want[:, None].expand_as(masked)], x[~want[:, None].expand_as(x)])


def test_iqformer_init_from_bert(stage1_assets):
    assert (
        bert_key_to_qformer("encoder.layer.3.attention.self.query.weight")
        == "qformer.encoder.layer.3.attention.attention.query.weight"
    )
    assert (
        bert_key_to_qformer("encoder.layer.0.output.LayerNorm.bias")
        == "qformer.encoder.layer.0.output_query.LayerNorm.bias"
    )
    assert (
        bert_key_to_qformer("encoder.layer.0.attention.output.dense.weight")
        == "qformer.encoder.layer.0.attention.output.dense.weight"
    )
    assert bert_key_to_qformer("embeddings.word_embeddings.weight") is None
    iq = IQFormer(
        IQFormerConfig(
            width=64,
            layers=2,
            heads=4,
            intermediate=128,
            num_queries=4,
            vision_width=64,
            text_width=64,
        )
    )
    report = init_from_bert(iq, str(stage1_assets / "tiny" / "bert"))
    from transformers import BertModel

    bert = BertModel.from_pretrained(stage1_assets / "tiny" / "bert")
    assert torch.equal(
        iq.state_dict()["qformer.encoder.layer.1.intermediate_query.dense.weight"],
        bert.state_dict()["encoder.layer.1.intermediate.dense.weight"],
    )
    assert any("crossattention" in k for k in report["random"]) and "queries" in report["random"]
    assert not any("crossattention" in k for k in report["loaded"])


def test_retrieval_recalls_definition():
    e = torch.eye(4)
    perfect = retrieval_recalls(e, e, ks=(1,))
    assert perfect["i2t_r@1"] == perfect["t2i_r@1"] == 1.0
    shifted = retrieval_recalls(e, e.roll(1, 0), ks=(1, 2))  # image i's best text is i+1
    assert shifted["i2t_r@1"] == 0.0
    text = torch.tensor([[1.0, 0.2], [0.9, 0.1], [0.0, 1.0]])
    image = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1
    )
    r = retrieval_recalls(image, torch.nn.functional.normalize(text, dim=-1), ks=(1,))
    # image 0 = image 1 = (1, 0) both rank text 1 first: image 1 hits, image 0 misses, image 2 hits
    assert r["i2t_r@1"] == pytest.approx(2 / 3)


def test_tied_scores_never_count_as_retrieved_in_either_direction():
    same = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    r = retrieval_recalls(same, same, ks=(1, 2))
    # pairs 0 and 1 are identical: each one's match ties with the other candidate
    assert r["i2t_r@1"] == r["t2i_r@1"] == pytest.approx(1 / 3)
    assert r["i2t_r@2"] == r["t2i_r@2"] == 1.0


def test_stage1_bench_step_runs_and_counts_flops():
    from mmtrain.bench.vikdf import stage1

    row = stage1(batch=4, iters=1, warm=0, compile_towers=False, size="tiny", device="cpu")
    assert row["gflop_per_sample"] > 0 and row["samples_s"] > 0 and row["size"] == "tiny"


def test_a_bert_of_another_shape_is_refused_before_training(stage1_assets, tmp_path):
    """It used to load nothing and train a random IQ-Former, saying so only at INFO."""
    from transformers import BertConfig

    from mmtrain.config import ConfigError, load_config

    BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    ).save_pretrained(tmp_path / "bert32")
    a = stage1_assets
    paths = [
        f"recipe.vision_path={a / 'tiny' / 'clip'}",
        f"recipe.text_path={a / 'tiny' / 'clip'}",
        f"recipe.data.train={a / 'it' / 'train'}",
        f"recipe.data.val={a / 'it' / 'val'}",
    ]
    config = Path(__file__).resolve().parents[3] / "configs" / "demo" / "vikdf_stage1.yaml"
    with pytest.raises(
        ConfigError,
        match=r"recipe.bert_init: the BERT in .*bert32 has width 32, layers 2, heads 4, "
        r"intermediate 64; the IQ-Former has width 64, layers 2, heads 4, intermediate 128: set "
        r"recipe.iqformer.width=32 recipe.iqformer.layers=2 recipe.iqformer.heads=4 "
        r"recipe.iqformer.intermediate=64",
    ):
        load_config(config, [*paths, f"recipe.bert_init={tmp_path / 'bert32'}"])
    shaped = [f"recipe.iqformer.{k}={v}" for k, v in [("width", 32), ("intermediate", 64)]]
    cfg = load_config(config, [*paths, f"recipe.bert_init={tmp_path / 'bert32'}", *shaped])
    assert cfg.recipe.iqformer.width == 32  # the suggested fix is accepted
    load_config(config, [*paths, f"recipe.bert_init={a / 'tiny' / 'bert'}"])  # the tiny BERT fits


@pytest.mark.parametrize("kind", ["released", "decoder"])
def test_the_released_head_block_reads_each_token_and_the_knowledge_only(kind):
    """Issue 19, item 4: in the released TA-MIM / IA-MTM block a masked position can only be
    recovered from the knowledge (cross-attention only); the decoder block also lets it read its
    neighbours (self-attention), so a masked patch can be solved without K."""
    from mmtrain.models.distill_heads import _block

    torch.manual_seed(0)
    block = _block(64, 4, kind).eval()
    tokens, knowledge = torch.randn(2, 10, 64), torch.randn(2, 8, 64)
    out = block(tokens, knowledge)
    # both start without reading K (a zero cross-attention output) ...
    assert torch.allclose(block(tokens, torch.randn(2, 8, 64)), out)
    cross = block.attn if kind == "released" else block.multihead_attn
    with torch.no_grad():  # ... as training moves it away from zero
        cross.out_proj.weight.normal_(0, 0.1)
    out = block(tokens, knowledge)
    assert not torch.allclose(block(tokens, torch.randn(2, 8, 64)), out)
    neighbours = tokens.clone()
    neighbours[:, 1:] = torch.randn(2, 9, 64)  # every token but the first changes
    reads_neighbours = not torch.allclose(block(neighbours, knowledge)[:, 0], out[:, 0])
    assert reads_neighbours == (kind == "decoder")
