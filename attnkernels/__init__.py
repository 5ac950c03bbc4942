"""attnkernels: fused dense, windowed, block-sparse and linear attention for PyTorch.

CPU tensors run C++ kernels, CUDA tensors Triton kernels; each family's
`reference.py` is the float64 oracle both are tested against. One folder per
family (`softmax/`, `linear/`), the same file names in each.
"""
import sys as _sys

from .backends import backend
from .softmax import (BlockMask, attention, attention_reference, attention_with_kvcache, masks, sparse_attention,
                      window_attention, windows)
from .linear import LinearAttentionState, PerformerFeatures, linear_attention, linear_attention_step
from . import nn  # noqa: E402  (drop-in modules; imports only the modules above)
from .integrations import flash_attn_interface  # noqa: E402  (FlashAttention's API on our kernels)

# `attnkernels.masks` and `attnkernels.windows` are public module paths (README); they are the softmax family's.
_sys.modules[__name__ + ".masks"] = masks
_sys.modules[__name__ + ".windows"] = windows
_sys.modules[__name__ + ".flash_attn_interface"] = flash_attn_interface

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_with_kvcache",
    "window_attention",
    "sparse_attention",
    "attention_reference",
    "linear_attention",
    "linear_attention_step",
    "LinearAttentionState",
    "PerformerFeatures",
    "backend",
    "masks",
    "windows",
    "BlockMask",
    "nn",
    "flash_attn_interface",
]
