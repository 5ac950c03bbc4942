"""Softmax attention: dense, causal, sliding-window, block-sparse, key padding.

api (public functions) -> call (SoftmaxCall, validated once) -> ops (custom ops,
backend registry) -> cpu_launch (C++) | triton_launch (Triton) | reference (float64 oracle).
"""
from . import masks, windows
from .api import attention, sparse_attention, window_attention
from .kvcache import attention_with_kvcache
from .masks import BlockMask
from .reference import attention_reference

__all__ = ["attention", "attention_with_kvcache", "window_attention", "sparse_attention", "attention_reference", "BlockMask", "masks", "windows"]
