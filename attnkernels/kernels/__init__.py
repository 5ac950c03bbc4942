"""Triton kernels for CUDA tensors, one file per family."""
