"""Drop-in torch modules backed by the attnkernels kernels.

`MultiheadAttention` replaces `torch.nn.MultiheadAttention` in the common
self-/cross-attention use and picks the attention family with `attention=`.
"""
from .multihead import ATTENTION_FAMILIES, MultiheadAttention

__all__ = ["MultiheadAttention", "ATTENTION_FAMILIES"]
