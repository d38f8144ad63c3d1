"""VIKDF (implicit visual knowledge into a frozen LLM), one file per stage over shared parts:

collate.py   the typed micro-batches (Stage1Batch, FusionBatch, DialogueBatch) and their
             collates; `Pixels` (images normalised on the device)
stage1.py    `recipe.name=vikdf_distill`: the IQ-Former distils TIM + TA-MIM + IA-MTM
fuse.py      `recipe.name=vikdf_fuse`: its config, BVIF around the LLM, what both phases share;
             `recipe.phase` picks one of
fusion.py    BVIF fusion on image-text pairs
dialogue.py  zero-resource dialogue fine-tuning, generation and the dialogue scores
"""

from mmtrain.recipes.vikdf.dialogue import VIKDFDialogue
from mmtrain.recipes.vikdf.fuse import FuseConfig, VIKDFFuse
from mmtrain.recipes.vikdf.fusion import VIKDFFusion
from mmtrain.recipes.vikdf.stage1 import Stage1Config, VIKDFDistill

__all__ = [
    "FuseConfig",
    "Stage1Config",
    "VIKDFDialogue",
    "VIKDFDistill",
    "VIKDFFuse",
    "VIKDFFusion",
]
