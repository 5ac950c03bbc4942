"""attnkernels: fused dense, windowed, block-sparse and linear attention for PyTorch.

CPU tensors run C++ kernels, CUDA tensors Triton kernels; `reference.py` is the
float64 oracle both are tested against.
"""
from . import masks
from .api import attention, sparse_attention, window_attention
from .backends import backend
from .linear import LinearAttentionState, PerformerFeatures, linear_attention, linear_attention_step
from .masks import BlockMask
from .reference import attention_reference
from . import nn  # noqa: E402  (drop-in modules; imports only the modules above)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "window_attention",
    "sparse_attention",
    "attention_reference",
    "linear_attention",
    "linear_attention_step",
    "LinearAttentionState",
    "PerformerFeatures",
    "backend",
    "masks",
    "BlockMask",
    "nn",
]
