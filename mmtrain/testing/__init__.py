"""Test fixtures that ship with the package: tiny models saved with save_pretrained (the demo
and the tests load them through the same from_pretrained path as real checkpoints)."""
