"""Loads the C++ CPU kernels built for the best capability this CPU has.

setup.py builds `attnkernels._C` (portable), `_C_avx2` and `_C_avx512`; each
registers its ops under `torch.ops.attnkernels_cpu_<capability>`. We pick the
best one that both the CPU (as torch reports it) and the build support.
`ATTNKERNELS_CPU_CAPABILITY=default|avx2|avx512` forces one (tests use it to
check that every variant gives the same answers); one this CPU cannot run is
refused with a ValueError naming it, never imported.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

_MODULE_BY_CAPABILITY = {"avx512": "_C_avx512", "avx2": "_C_avx2", "default": "_C"}
_ORDER = ["avx512", "avx2", "default"]


def _cpu_supported() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability().lower()
    if cap.startswith("avx512"):
        return ["avx512", "avx2", "default"]
    if cap.startswith("avx2"):
        return ["avx2", "default"]
    return ["default"]


class CpuKernels:
    """The chosen build: `ops` is the torch.ops namespace, `capability` its name."""

    def __init__(self, capability: str, ops, error: str | None = None):
        self.capability = capability
        self.ops = ops
        self.error = error

    @property
    def available(self) -> bool:
        return self.ops is not None

    def gemm_paths(self, dtypes=("bfloat16", "float16", "float32")) -> dict[str, str] | None:
        """{dtype name: the unit its tile GEMMs run on} ("amx-bf16", "avx512-bf16", "fp32-upcast", ...),
        as the build's `gemm_path` op reports it for this CPU; None without a build that has the op."""
        if not self.available or not hasattr(self.ops, "gemm_path"):
            return None
        return {d: self.ops.gemm_path(d) for d in dtypes}


@functools.lru_cache(maxsize=None)
def load(capability: str | None = None) -> CpuKernels:
    forced = capability or os.environ.get("ATTNKERNELS_CPU_CAPABILITY")
    candidates = [forced.lower()] if forced else [c for c in _ORDER if c in _cpu_supported()]
    errors = []
    for cap in candidates:
        if cap not in _MODULE_BY_CAPABILITY:
            raise ValueError(f"ATTNKERNELS_CPU_CAPABILITY={cap!r}: expected one of {list(_MODULE_BY_CAPABILITY)}")
        if cap not in _cpu_supported():
            # Importing a build compiled for instructions this CPU lacks dies with SIGILL in its
            # static initialisers, before any Python error could be raised: refuse first.
            raise ValueError(
                f"ATTNKERNELS_CPU_CAPABILITY={cap!r}: this CPU (torch CPU capability "
                f"{torch.backends.cpu.get_cpu_capability()}) runs only {_cpu_supported()}"
            )
        try:
            module = importlib.import_module(f"attnkernels.{_MODULE_BY_CAPABILITY[cap]}")
        except ImportError as exc:
            errors.append(f"{cap}: {exc}")
            continue
        return CpuKernels(cap, getattr(torch.ops, module.namespace))
    return CpuKernels(
        "none",
        None,
        "the C++ extension is not built (" + "; ".join(errors) + "). "
        "Install with `pip install --no-build-isolation -e .`",
    )
