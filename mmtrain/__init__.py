"""mmtrain: distributed training of multimodal LLM methods (VIKDF, Dynamic CoT, KDSL)."""

__version__ = "0.1.0"
