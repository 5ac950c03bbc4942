"""Linear (kernelized) attention: elu+1, ReLU, identity and Performer FAVOR+ features."""
from .reference import apply_feature_map, linear_attention_reference

__all__ = ["apply_feature_map", "linear_attention_reference"]
