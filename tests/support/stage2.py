"""What VIKDF stage 2 starts from: image-text and dialogue shards, and a stage-1 IQ-Former export."""

from pathlib import Path

from mmtrain.data.synth import synth
from mmtrain.models.iqformer import IQFormer
from mmtrain_testing.tiny import iqformer_config


def stage2_assets(root: Path, samples: int, **iqformer) -> Path:
    """root/it, root/dlg (`samples` each) and root/stage1/iqformer (a tiny, untrained IQ-Former)."""
    synth("image-text", str(root / "it"), samples, seed=0)
    synth("dialogue", str(root / "dlg"), samples, seed=0)
    config = iqformer_config("tiny", **iqformer)
    IQFormer(config).save_pretrained(root / "stage1" / "iqformer")
    return root
