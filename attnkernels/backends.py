"""Which implementation runs a call: a registry {family: {backend: Backend}}.

Each family's ops.py registers its backends ("cpu" = the C++ kernels, "triton",
"reference" = the float64 oracle) with a forward, a backward and a `declines`
function that says why that backend cannot run a call (device, build, dtype), or
None. By default CPU tensors go to "cpu" and CUDA tensors to "triton";
`with attnkernels.backend("reference"):` forces one for the calls made in that
block, on this thread. The choice is read when an op runs (not when it is traced),
so compiled graphs honour it too. When the chosen backend declines, one error
lists every backend of the family and why each declined (as xFormers does).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Callable, Optional

import torch

BACKENDS = ("cpu", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable  # (call, *data tensors) -> the op's outputs
    backward: Callable  # (call, grad outputs and saved tensors) -> input grads
    declines: Callable[[torch.device], Optional[str]]  # why it cannot run on this device, or None
    features: frozenset = frozenset()  # the optional call features (e.g. softmax modifiers) it implements


class BackendUnavailable(ValueError, RuntimeError):
    """No backend can run the call: a ValueError when the tensors' device rules it out, a RuntimeError when
    the build lacks it; one class for both, so a caller catches either (the message says which)."""


_REGISTRY: dict[str, dict[str, Backend]] = {}
_state = threading.local()


# (family, device type, needs) -> the default backend, once it accepted such a call: what it depends on
# (the device type, the build, triton's import) is fixed for the process, and a decode step selects
# twice per token (~3 us each through _declines). Forced backends are never cached.
_DEFAULT_ACCEPTED: dict[tuple, Backend] = {}


def register(family: str, backend: Backend) -> None:
    if backend.name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend.name!r}")
    _REGISTRY.setdefault(family, {})[backend.name] = backend
    _DEFAULT_ACCEPTED.clear()


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


def default_backend(device: torch.device) -> str | None:
    return {"cuda": "triton", "cpu": "cpu"}.get(device.type)


def _declines(backend: Backend, device: torch.device, needs: frozenset) -> str | None:
    missing = sorted(needs - backend.features)
    if missing:
        return f"it does not implement {', '.join(missing)}"
    return backend.declines(device)


def select(family: str, device: torch.device, needs: frozenset = frozenset()) -> Backend:
    """The backend that runs a `family` call on tensors of `device` using the optional features `needs`,
    or an error saying why none can."""
    forced = forced_backend()
    if forced is None:
        key = (family, device.type, needs)
        chosen = _DEFAULT_ACCEPTED.get(key)
        if chosen is not None:
            return chosen
    backends = _REGISTRY[family]
    name = forced or default_backend(device)
    if name is None:
        raise ValueError(
            f"device: attnkernels runs on CPU (C++ kernels) and CUDA (Triton kernels); got tensors on {device}. "
            "Use `attnkernels.backend('reference')` for a plain-PyTorch path on other devices."
        )
    chosen = backends[name]
    why = _declines(chosen, device, needs)
    if why is None:
        if forced is None:
            _DEFAULT_ACCEPTED[key] = chosen
        return chosen
    others = "; ".join(
        f"{other.name}: {_declines(other, device, needs) or 'available'}"
        for other in backends.values() if other is not chosen
    )
    how = "forced by attnkernels.backend()" if forced_backend() else f"the default for {device.type} tensors"
    raise BackendUnavailable(f"backend {name!r} ({how}) cannot run this {family} call: {why}. Backends: {others}")


def why_not(family: str, name: str, device: torch.device, needs: frozenset = frozenset()) -> str | None:
    """None if backend `name` can run `family` calls using the features `needs` on `device` here, else the reason."""
    return _declines(_REGISTRY[family][name], device, frozenset(needs))


# --- what each backend needs, shared by the families --------------------------------------


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


def triton_declines(device: torch.device) -> str | None:
    ok, why = triton_status()
    if not ok:
        return why
    if device.type == "cpu" and not triton_interpreted():
        return ("it needs CUDA tensors; on CPU tensors it runs only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before triton is first imported)")
    if device.type not in ("cpu", "cuda"):
        return f"it needs CUDA tensors, got tensors on {device}"
    return None


def cpu_status() -> tuple[bool, str]:
    from . import _cpu_backend

    kernels = _cpu_backend.load()
    return kernels.available, kernels.error or ""


def cpu_declines(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it runs the C++ kernels on CPU tensors, got tensors on {device}"
    ok, why = cpu_status()
    return None if ok else why


def reference_declines(device: torch.device) -> str | None:
    return None


def cpu_kernels():
    """The torch.ops namespace of the C++ kernels chosen for this CPU."""
    from . import _cpu_backend

    return _cpu_backend.load().ops
