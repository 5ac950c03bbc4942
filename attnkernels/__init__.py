"""attnkernels: fused dense, windowed, block-sparse and linear attention."""
from .backends import backend
from .reference import attention_reference

__version__ = "0.1.0"
