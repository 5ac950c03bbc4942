"""Build of the C++ CPU kernels (attnkernels._C*).

The kernels in csrc/ are compiled once per CPU capability, because
`at::vec::Vectorized` is plain scalar code unless the translation unit is
compiled with the matching ISA flags, and `-march=native` would produce a
binary that crashes on older CPUs. `attnkernels/_cpu_backend.py` picks the best
build at import time from `torch.backends.cpu.get_cpu_capability()`.

Set ATTNKERNELS_CPU_CAPABILITIES=default,avx2,avx512 (the default) to choose
which variants are built; a developer can build only one to iterate faster.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - exercised on a machine without torch
    sys.exit(
        "attnkernels needs PyTorch at build time, and it must not be installed by build "
        "isolation (that would pull a multi-GB CUDA build). Install torch first, then:\n"
        "    pip install torch==2.13.0\n"
        "    pip install --no-build-isolation -e .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))

# capability name -> (extension suffix, compiler flags). The CPU_CAPABILITY
# defines select the matching at::vec implementation inside torch's headers.
CAPABILITIES = {
    "default": ("_C", ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]),
    "avx2": (
        "_C_avx2",
        ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    ),
    "avx512": (
        "_C_avx512",
        [
            "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
            "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
        ],
    ),
}

COMMON_FLAGS = ["-O3", "-g0", "-fopenmp", "-std=c++17", "-DNDEBUG", "-Wno-unused-function"]


def extensions():
    wanted = os.environ.get("ATTNKERNELS_CPU_CAPABILITIES", "default,avx2,avx512")
    names = [w.strip().lower() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in CAPABILITIES]
    if unknown:
        sys.exit(f"ATTNKERNELS_CPU_CAPABILITIES: unknown capability {unknown}; expected a subset of {list(CAPABILITIES)}")
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    # The shared headers (csrc/common/*.h): setuptools skips an extension whose sources
    # and `depends` are all older than its library, so a header-only change must be listed.
    headers = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "common", "*.h")))
    exts = []
    for name in names:
        suffix, isa_flags = CAPABILITIES[name]
        exts.append(
            CppExtension(
                name=f"attnkernels.{suffix}",
                sources=sources,
                depends=headers,
                include_dirs=[os.path.join(HERE, "csrc")],
                # Each variant registers its ops under its own namespace so that
                # two variants can never collide if both get loaded.
                define_macros=[("ATTNKERNELS_NS", f"attnkernels_cpu_{name}")],
                extra_compile_args=COMMON_FLAGS + isa_flags,
                extra_link_args=["-fopenmp"],
            )
        )
    return exts


class PerCapabilityBuildExt(BuildExtension):
    """Every capability compiles the same csrc/*.cpp with other flags: give each variant its
    own object directory, or one variant's objects (and ninja file) would be linked into
    another's library — a parallel `-j` build then produced an AVX-512 .so with no ops.
    The variants are built one after another (the object directory is per-call state);
    ninja still compiles each variant's files in parallel."""

    def build_extensions(self):
        self.parallel = None
        super().build_extensions()

    def build_extension(self, ext):
        shared_temp = self.build_temp
        self.build_temp = os.path.join(shared_temp, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": PerCapabilityBuildExt.with_options(use_ninja=True)},
)
