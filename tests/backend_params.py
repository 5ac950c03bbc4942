"""Which backends a test can run here, and a skip that says why when one cannot."""
import importlib.util

import pytest

from attnkernels import backends

BACKENDS = ("reference", "cpu", "triton")

# The Triton kernels of each family live in their own module; a family whose
# module is not merged yet skips its Triton tests with that reason.
TRITON_MODULES = {"softmax": "attnkernels.kernels.attention", "linear": "attnkernels.kernels.linear_attention"}


def backend_unavailable(name: str, family: str = "softmax") -> str | None:
    """None if `name` can run `family`'s kernels on CPU tensors in this process, else the reason."""
    if name == "cpu":
        ok, why = backends.cpu_status()
        return None if ok else why
    if name == "triton":
        ok, why = backends.triton_status()
        if not ok:
            return why
        if not backends.triton_interpreted():
            return "TRITON_INTERPRET=1 was not set before triton was imported"
        if importlib.util.find_spec(TRITON_MODULES[family]) is None:
            return f"{TRITON_MODULES[family]} is missing"
    return None


def backend_param(name: str, family: str = "softmax") -> None:
    """Skip the calling test, printing the reason, when backend `name` cannot run `family`."""
    reason = backend_unavailable(name, family)
    if reason:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
