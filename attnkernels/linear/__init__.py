"""Linear (kernelized) attention: elu+1, ReLU, identity and Performer FAVOR+ features."""
from .api import LinearAttentionState, linear_attention, linear_attention_step
from .features import PerformerFeatures
from .reference import apply_feature_map, linear_attention_reference

__all__ = [
    "LinearAttentionState",
    "PerformerFeatures",
    "apply_feature_map",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
]
