"""Which backends a test can run here, and a skip that says why when one cannot."""
import importlib.util

import pytest

from attnkernels import backends

BACKENDS = ("reference", "cpu", "triton")


def backend_unavailable(name: str) -> str | None:
    """None if `name` can run on CPU tensors in this process, else the reason."""
    if name == "cpu":
        ok, why = backends.cpu_status()
        return None if ok else why
    if name == "triton":
        ok, why = backends.triton_status()
        if not ok:
            return why
        if not backends.triton_interpreted():
            return "TRITON_INTERPRET=1 was not set before triton was imported"
        if importlib.util.find_spec("attnkernels.kernels.attention") is None:
            return "attnkernels.kernels.attention is missing"
    return None


def backend_param(name: str) -> None:
    """Skip the calling test, printing the reason, when backend `name` cannot run."""
    reason = backend_unavailable(name)
    if reason:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
