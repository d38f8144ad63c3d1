"""What VIKDF stage 2 starts from: image-text and dialogue shards, and a stage-1 IQ-Former export."""

from pathlib import Path

from mmtrain.data.synth import synth
from mmtrain.models.iqformer import IQFormer, IQFormerConfig


def stage2_assets(root: Path, samples: int, **iqformer) -> Path:
    """root/it, root/dlg (`samples` each) and root/stage1/iqformer (a tiny, untrained IQ-Former)."""
    synth("image-text", str(root / "it"), samples, seed=0)
    synth("dialogue", str(root / "dlg"), samples, seed=0)
    config = IQFormerConfig(
        width=64,
        layers=2,
        heads=4,
        intermediate=128,
        num_queries=8,
        cross_attention_every=1,
        vision_width=64,
        text_width=64,
        **iqformer,
    )
    IQFormer(config).save_pretrained(root / "stage1" / "iqformer")
    return root
