"""What the C++ kernel tests share: the window spellings of their ids, one-thread runs, the ops namespace."""
import pytest
import torch

from attnkernels import backends

DENSE, CAUSAL = (-1, -1), (-1, 0)


def ops():
    """The torch.ops namespace of the C++ build chosen for this CPU."""
    return backends.cpu_kernels()


def window_mode(window) -> str:
    """The window part of a test id: dense, causal or winL_R."""
    if window == DENSE:
        return "dense"
    if window == CAUSAL:
        return "causal"
    return f"win{window[0]}_{window[1]}"


@pytest.fixture(autouse=True)
def one_thread():
    """One thread unless a test sets more: the host's cores are shared, and a parallel region waiting for a
    descheduled thread turns a 0.1 s test into seconds. Thread counts are compared bitwise where it matters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
