"""How a Triton kernel declares the configs it is compiled with ahead of time.

Each kernel module exposes `AOT_SPECS: list[KernelSpec]`; the compile gate
(`python -m attnkernels.tools.compile_report`) compiles every spec for sm_80 and
sm_90a with no GPU and checks registers, spills and tensor-core instructions.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str  # readable id, e.g. "attn_fwd-fp16-D64-M128-N64"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 2
    uses_dot: bool = True  # a kernel with tl.dot must show mma/wgmma in its PTX
