"""The one window convention of attnkernels, and conversions from other libraries'.

Query i sees key j iff  i + Nk - Nq - left <= j <= i + Nk - Nq + right
(bottom-right aligned, as FlashAttention), `-1` meaning unbounded on that side.
`causal=True` is `right = 0`.
"""
from __future__ import annotations

import numbers

UNBOUNDED = -1


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
