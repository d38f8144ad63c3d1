"""LoRA under ZeRO-3: the exported adapter is complete and loads back into plain transformers + peft."""

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mmtrain.cli import main
from tests.helpers import train


def test_lora_adapter_exported_from_zero3_loads_in_peft(tmp_path):
    base_dir = tmp_path / "base-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(base_dir)
    run = tmp_path / "runs" / "lora"
    train(
        run,
        [
            f"recipe.model_path={base_dir}",
            "recipe.lora.enabled=true",
            "recipe.lora.r=4",
            "train.steps=8",
            "train.lr=1e-2",
            "deepspeed.zero_stage=3",
        ],
    )
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--merge-lora"]) == 0
    assert json.loads((out / "export.json").read_text())["modules"] == {
        "lm": "peft-adapter",
        "lm-merged": "hf",
    }

    adapter = load_file(out / "lm" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(adapter) == 2 * 2 * 2 and len(lora_b) == 4  # A and B, q and v, 2 layers
    assert all(v.abs().sum() > 0 for v in lora_b)  # trained, not the zero init
    whole = load_file(out / "model.safetensors")
    key = next(k for k in adapter if "lora_B" in k)
    assert torch.equal(
        adapter[key], whole["lm." + key.replace("lora_B.weight", "lora_B.default.weight")]
    )

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, out / "lm").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "lm-merged").eval()
    ids = torch.randint(64, (2, 16))
    with torch.no_grad():
        lora_logits = model(ids).logits
        assert torch.allclose(lora_logits, merged(ids).logits, atol=1e-4)
        # the adapter changes the frozen base's output
        with model.disable_adapter():
            assert not torch.allclose(lora_logits, model(ids).logits, atol=1e-3)
    # the frozen base weights in the consolidated file are the originals
    assert torch.equal(
        whole["lm.base_model.model.model.embed_tokens.weight"],
        original["model.embed_tokens.weight"],
    )
