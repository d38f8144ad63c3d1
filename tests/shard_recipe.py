"""A test recipe that trains through the shard reader: predict an image's colour from its pixels.
It is also the smallest example of a recipe defined outside mmtrain (`recipe.name=module:Class`)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection, SampleDecoder, default_collate
from mmtrain.data.synth import COLORS
from mmtrain.recipes.base import StepOutput
from mmtrain.recipes.common import ShardRecipe
from mmtrain.schema import RecipeConfig


@dataclass
class ShardColorConfig(RecipeConfig):
    name: str = "tests.shard_recipe:ShardColor"
    data: DataSection = field(default_factory=DataSection)
    image_size: int = 16

    def data_kind(self) -> str:
        return "image-text"


class ColorNet(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * size * size, 32), nn.ReLU(), nn.Linear(32, len(COLORS))
        )

    def forward(self, image, label):
        return {"ce": nn.functional.cross_entropy(self.net(image), label)}


def collate(items):
    batch = default_collate(items)
    batch["label"] = torch.tensor([list(COLORS).index(m["color"]) for m in batch["meta"]])
    return batch


class ShardColor(ShardRecipe):
    Config = ShardColorConfig

    def build_model(self):
        return ColorNet(self.cfg.image_size)

    def pipeline(self):
        return SampleDecoder(self.transform, need_image=True), collate

    @property
    def transform(self):
        return ImageTransform(resize=self.cfg.image_size, crop=self.cfg.image_size)

    def step(self, model, batch):
        pixels = self.transform.normalize(batch["image"].to(self.ctx.device))  # uint8 -> fp32
        out = model(pixels, batch["label"].to(self.ctx.device))
        return StepOutput(losses={"ce": out["ce"]}, samples=len(batch["label"]))
