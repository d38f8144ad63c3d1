"""Fused Triton kernels for mmtrain's losses. Standalone: imports nothing from mmtrain."""
