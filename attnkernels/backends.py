"""Which implementation runs a call: "cpu" (C++), "triton", or "reference".

By default CPU tensors go to the C++ kernels and CUDA tensors to Triton.
`with attnkernels.backend("reference"):` forces one for the calls made in that
block, on this thread. The choice is read when an op runs (not when it is
traced), so compiled graphs honour it too.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

BACKENDS = ("cpu", "triton", "reference")

_state = threading.local()


@contextlib.contextmanager
def backend(name: str):
    """Force one implementation for the calls made inside the block (this thread)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def forced_backend() -> str | None:
    return getattr(_state, "forced", None)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(usable, why not). Triton is importable on this machine or it is not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        return False, f"triton is not installed ({exc}); `pip install triton==3.8.0`"
    return True, ""


def cpu_status() -> tuple[bool, str]:
    from . import _cpu_backend

    kernels = _cpu_backend.load()
    return kernels.available, kernels.error or ""


def select(device: torch.device) -> str:
    """The backend that runs a call on tensors of `device`, or a ValueError saying why none can."""
    name = forced_backend()
    if name is None:
        name = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
        if name is None:
            raise ValueError(
                f"device: attnkernels runs on CPU (C++ kernels) and CUDA (Triton kernels); got tensors on {device}. "
                "Use `attnkernels.backend('reference')` for a plain-PyTorch path on other devices."
            )
    if name == "reference":
        return name
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs the C++ kernels on CPU tensors; got tensors on {device}")
        ok, why = cpu_status()
        if not ok:
            raise RuntimeError(f"backend 'cpu' is unavailable: {why}")
        return name
    # triton
    ok, why = triton_status()
    if not ok:
        raise RuntimeError(f"backend 'triton' is unavailable: {why}")
    if device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            "backend 'triton' needs CUDA tensors; on CPU tensors it runs only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is first imported)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend 'triton' needs CUDA tensors; got tensors on {device}")
    return name


def cpu_kernels():
    """The torch.ops namespace of the C++ kernels chosen for this CPU."""
    from . import _cpu_backend

    return _cpu_backend.load().ops
