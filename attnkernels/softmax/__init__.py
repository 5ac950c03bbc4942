"""Softmax attention: dense, causal, sliding-window, block-sparse, key padding."""
