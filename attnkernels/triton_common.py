"""What the two Triton families (softmax, linear) share: the AOT spec type the compile gate
reads, padding and precision rules, launch options, the test hook that overrides tiles,
and the argument typing of the AOT specs.

Each family's `triton_specs.AOT_SPECS` is a `list[KernelSpec]`; the compile gate
(`python -m attnkernels.tools.compile_report`) compiles every spec for sm_80 and sm_90a
with no GPU and checks registers, spills and tensor-core instructions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
import triton

# storage dtype -> the Triton pointer type label of the AOT signatures
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


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
    # Marks the representative spec of its (kernel, dtype, archs) group for `--quick`; a
    # group with none marked is represented by its first spec.
    quick: bool = False
    # The archs (compute capabilities) this spec is compiled for: None = every arch the gate
    # runs; (90,) for a config that only sm_90a launches.
    archs: tuple | None = None
    # ((problem, reason), ...): gate problems this spec is known to have and why; the gate
    # reports them instead of failing (only the WAIVABLE ones of compile_report)
    waive: tuple = ()


def pad_dim(d: int) -> int:
    """A head dim padded to a power of two >= 16 (every tl.dot dimension >= 16)."""
    return max(16, triton.next_power_of_2(d))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 stays exact ("ieee") unless the user enabled TF32 matmuls, like torch; otherwise
    "tf32" (16-bit inputs ignore it on 16-bit operands, and a 16-bit value is exact in TF32
    where a dot takes float32 operands)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def row_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, N, D) tensor, as the kernels take them (last dim contiguous)."""
    return t.stride(0), t.stride(1), t.stride(2)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take strides for every dim but the last, which must be contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_options(cfg) -> dict:
    """Compile options of a launch from a config with num_warps, num_stages, maxnreg
    (maxnreg only when set)."""
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg is not None:
        opts["maxnreg"] = cfg.maxnreg
    return opts


class Override:
    """A test hook: a value (None unless inside `with hook.set(value)`) that a launcher reads
    to replace its tile sizes, so that small interpreter shapes span many tiles. The code
    path is the one that ships; only the tile sizes change."""

    def __init__(self):
        self.value = None

    @contextlib.contextmanager
    def set(self, value):
        previous, self.value = self.value, value
        try:
            yield
        finally:
            self.value = previous


def signature(fn, dtype: str, constexprs: dict, *, int_args=(), fp32_args=(), fp32_ptrs=(),
              i32_ptrs=(), u8_ptrs=(), i64_ptrs=()) -> dict:
    """Triton type per argument of jitted `fn`, from the naming convention of the kernel
    files: constexpr-annotated -> "constexpr" (must be in `constexprs`); the named pointer
    sets; `stride_*` and `int_args` -> i32 (before the upper-case rule, so a size called "N"
    is an int); other upper-case names -> data pointers `*dtype`; `fp32_args` -> fp32."""
    sig = {}
    # the plain Python function (works for a JITFunction and for the interpreter's wrapper)
    for name, param in inspect.signature(fn.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            assert name in constexprs, f"{fn.__name__}: constexpr {name} needs a value"
            sig[name] = "constexpr"
        elif name in fp32_ptrs:
            sig[name] = "*fp32"
        elif name in i32_ptrs:
            sig[name] = "*i32"
        elif name in u8_ptrs:
            sig[name] = "*u8"
        elif name in i64_ptrs:
            sig[name] = "*i64"
        elif name.startswith("stride_") or name in int_args:
            sig[name] = "i32"
        elif name.isupper():
            sig[name] = f"*{dtype}"
        elif name in fp32_args:
            sig[name] = "fp32"
        else:
            raise AssertionError(f"{fn.__name__}: no Triton type for argument {name!r}")
    return sig


def divisibility(signature: dict, skip_strides=()) -> dict:
    """The specialization the JIT gives a launch on contiguous (or BNHD-transposed) tensors
    with head dims that are multiples of 16: every pointer 16-byte aligned (torch
    allocations are) and every stride divisible by 16, except the strides whose names start
    with one of `skip_strides` (tables, masks: arbitrary). Sizes get nothing."""
    div = [["tt.divisibility", 16]]
    return {name: div for name, ty in signature.items()
            if ty.startswith("*") or (name.startswith("stride_") and not name.startswith(tuple(skip_strides)))}
