"""VIKDF stage 2 (BVIF fusion, dialogue fine-tuning, generation + metrics) on 2 CPU ranks under ZeRO-3."""


def test_fusion_bench_step_runs_and_counts_flops():
    from mmtrain.bench.vikdf import fusion

    row = fusion(batch=2, text_len=6, iters=1, warm=0, size="tiny", device="cpu")
    assert (
        row["tok_s"] > 0
        and row["tflops"] >= 0
        and row["llm_tokens_per_step"] == 2 * ((9 + 6 + 8) + (9 + 8 + 7))
    )
