"""How a Triton kernel declares the configs it is compiled with ahead of time.

Each kernel module exposes `AOT_SPECS: list[KernelSpec]`; the compile gate
(`python -m attnkernels.tools.compile_report`) compiles every spec for sm_80 and
sm_90a with no GPU and checks registers, spills and tensor-core instructions.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str  # readable id, e.g. "attn_fwd-fp16-D64-M128-N64"; unique within its module
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    # argument name -> Triton attributes, as the JIT specializes them at launch: pointers
    # 16-byte aligned and int arguments divisible by 16 get [["tt.divisibility", 16]].
    # Without them loads are not vectorised and the compile (registers, spills) is not the
    # one that runs.
    attrs: dict = dataclasses.field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None  # compile option: registers per thread ptxas may use
    # The kernel's matmuls must reach tensor cores: its PTX must show mma (sm_80) or
    # wgmma/mma (sm_90a). False for kernels without tl.dot, and for exact-fp32 ("ieee")
    # dots, which run on CUDA cores by design.
    uses_dot: bool = True
    # Compute dtype label ("fp16", "bf16", "fp32", "tf32", ...): `--quick` compiles one spec
    # per (kernel, dtype). Empty: taken from the first pointer argument's type.
    dtype: str = ""
    # Marks the representative spec of its (kernel, dtype) group for `--quick`; a group
    # with none marked is represented by its first spec.
    quick: bool = False
