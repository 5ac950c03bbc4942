"""Which backends a test can run here, and a skip that says why when one cannot."""
import functools

import pytest
import torch

from attnkernels import backends

BACKENDS = ("reference", "cpu", "triton")


def backend_unavailable(name: str, family: str = "softmax") -> str | None:
    """None if `name` can run `family`'s kernels on CPU tensors in this process, else the reason
    (the registry's own answer, so a test skips for exactly the reason a user call would fail)."""
    return backends.why_not(family, name, torch.device("cpu"))


def backend_param(name: str, family: str = "softmax") -> None:
    """Skip the calling test, printing the reason, when backend `name` cannot run `family`."""
    reason = backend_unavailable(name, family)
    if reason:
        pytest.skip(f"backend {name!r} unavailable: {reason}")


_FEATURE_PROBES = {
    # feature -> attention() kwargs that exercise it on a tiny (1, 1, 16, 16) call
    "key_padding_mask": lambda: {"key_padding_mask": torch.tensor([[True] + [False] * 15])},
    "block_mask": lambda: {"block_mask": __import__("attnkernels").masks.causal(16, block_size=16)},
}


@functools.lru_cache(maxsize=None)
def feature_unavailable(name: str, feature: str) -> str | None:
    """None if backend `name` implements `feature` of attention(), else why not.

    Kernels land feature by feature; a probe call that raises NotImplementedError
    says the feature is not there yet (and the test is skipped, not failed).
    """
    import attnkernels

    reason = backend_unavailable(name)
    if reason:
        return reason
    q = torch.randn(1, 1, 16, 16)
    try:
        with attnkernels.backend(name):
            attnkernels.attention(q, q, q, **_FEATURE_PROBES[feature]())
    except NotImplementedError as exc:
        return str(exc)
    return None


def backend_feature_param(name: str, *features: str) -> None:
    """backend_param, plus a skip when backend `name` lacks one of `features`."""
    backend_param(name)
    for feature in features:
        reason = feature_unavailable(name, feature)
        if reason:
            pytest.skip(f"backend {name!r} lacks {feature}: {reason}")


def backend_modifier_param(name: str, *modifiers: str) -> None:
    """backend_param, plus a skip (with the registry's reason) when backend `name`'s kernels do not
    implement one of the score `modifiers` (softmax.call.FEATURES: softcap, alibi, attn_bias, dropout)."""
    backend_param(name)
    reason = backends.why_not("softmax", name, torch.device("cpu"), frozenset(modifiers))
    if reason:
        pytest.skip(f"backend {name!r}: {reason}")
