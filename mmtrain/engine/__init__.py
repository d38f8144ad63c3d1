"""The training engine: process group, DeepSpeed, the loop, checkpoints, monitoring, export."""
