"""The one window convention of attnkernels, and conversions from other libraries'.

Query i sees key j iff  i + Nk - Nq - left <= j <= i + Nk - Nq + right
(bottom-right aligned, as FlashAttention), `-1` meaning unbounded on that side.
`causal=True` is `right = 0`.
"""
from __future__ import annotations

import numbers

from ..conventions import UNBOUNDED


def resolve_window(window_size, causal: bool) -> tuple[int, int]:
    """(window_size, causal) -> the (left, right) pair the kernels take.

    `window_size` is None (dense), an int w (meaning (w, w)) or a pair.
    Raises ValueError/TypeError naming `window_size` on anything else.
    """
    if window_size is None:
        left, right = UNBOUNDED, UNBOUNDED
    elif isinstance(window_size, bool):
        raise TypeError(f"window_size: expected an int or a (left, right) pair of ints, got bool {window_size!r}")
    elif isinstance(window_size, numbers.Integral):
        left = right = int(window_size)
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        left, right = window_size
    else:
        raise TypeError(f"window_size: expected an int or a (left, right) pair of ints, got {window_size!r}")
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"window_size: {side} must be an int (-1 = unbounded), got {value!r} of type {type(value).__name__}")
        if value < UNBOUNDED:
            raise ValueError(f"window_size: {side} must be >= -1 (-1 = unbounded), got {value}")
    left, right = int(left), int(right)
    if causal:
        right = 0 if right == UNBOUNDED else min(right, 0)
    return left, right


def is_dense(window: tuple[int, int]) -> bool:
    return window == (UNBOUNDED, UNBOUNDED)


# --- other libraries' window sizes -> (left, right) ------------------------------------------
# Each is checked in tests/test_windows.py against a mask built by that library's
# documented rule (or by the library itself where it runs here).


def from_hf_sliding_window(sliding_window: int) -> tuple[int, int]:
    """Mistral / HF `config.sliding_window = W`: W keys including the query itself, causal."""
    _positive("sliding_window", sliding_window)
    return sliding_window - 1, 0


def from_hf_bidirectional_window(sliding_window: int) -> tuple[int, int]:
    """HF transformers' two-sided `sliding_window = W` (ModernBERT, Gemma3 bidirectional): |i - j| < W."""
    _positive("sliding_window", sliding_window)
    return sliding_window - 1, sliding_window - 1


def from_flex_sliding_window(window: int) -> tuple[int, int]:
    """FlexAttention / attention-gym mask_mod `causal & (q_idx - kv_idx <= window)`."""
    _non_negative("window", window)
    return window, 0


def from_xformers_local(window_left: int, window_right: int) -> tuple[int, int]:
    """xFormers `LocalAttentionFromBottomRightMask(window_left, window_right)`: the same rule as ours."""
    _non_negative("window_left", window_left)
    _non_negative("window_right", window_right)
    return window_left, window_right


def from_flash_attn(window_size: tuple[int, int]) -> tuple[int, int]:
    """FlashAttention `window_size=(left, right)`: identical convention (-1 = unbounded)."""
    return resolve_window(tuple(window_size), causal=False)


def from_local_attention(window_size: int, *, causal: bool, look_backward: int = 1, look_forward: int | None = None) -> tuple[int, int]:
    """lucidrains local-attention with `exact_windowsize=True`.

    Causal: keys t - window_size·look_backward ... t. Non-causal: additionally up
    to t + window_size·look_forward (look_forward defaults to 0 when causal, 1 otherwise).
    Without exact_windowsize that library attends to whole buckets, which is not a band.
    """
    _positive("window_size", window_size)
    if look_forward is None:
        look_forward = 0 if causal else 1
    return window_size * look_backward, 0 if causal else window_size * look_forward


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
