"""Ahead-of-time GPU compile gate: every Triton kernel config, for sm_80 and sm_90a, no GPU needed.

    python -m attnkernels.tools.compile_report [--arch 80 90] [--json PATH] [--markdown]
                                               [--quick] [--filter SUBSTR] [--jobs N]

For each `KernelSpec` in the `AOT_SPECS` of the modules in `KERNEL_MODULES`, and each
arch, it runs `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, then
reads from the result:
- registers and spill bytes: `ptxas -v` (the binary shipped in the triton wheel) run on
  the PTX with the flags Triton itself uses (the compiled kernel's `n_regs`/`n_spills`
  stay None without a GPU);
- shared memory: the launch's dynamic shared memory (`metadata.shared`);
- tensor cores: `mma.sync` (sm_80) / `wgmma.mma_async` or `mma.sync` (sm_90a) in the PTX.

Per spec and arch it reports the tile (constexpr BLOCK_* sizes), warps, stages, registers,
spills, shared memory and the MMA instructions by kind and shape (e.g. "wgmma.m64n128k16.bf16
x60"), and prints the triton and ptxas versions first. Exit status 1 on any compile error,
any spill, a spec with `uses_dot` whose PTX has no tensor-core instruction, shared memory
over the arch's per-block limit, `mma.sync` in a 16-bit sm_90a kernel with a dot (no
wgmma), TF32 MMAs in a kernel on 16-bit inputs, or duplicated MMA work ("dup-mma", below);
0 otherwise.

MMA work per loop body ("MMA/loop body (min) ratio" column; `mma_per_body`): a spec module
may declare, per spec name, the (M, N, K) of each tl.dot in one iteration of the kernel's
inner loop, or of the whole kernel where no loop holds a dot (`AOT_DOTS`; the softmax and
linear modules do; a spec without: "-"). The gate
finds the innermost PTX loops that hold MMAs (a label and a branch back to it), takes the
busiest, and turns its per-thread MMA instructions into the CTA's multiply-adds: m*n*k per
instruction times the issuers (every warp for mma.sync, every warpgroup for wgmma). The
minimum is sum(M*N*K) of the declared dots; ratio = measured / minimum, and "min" is the
instruction count at ratio 1 with the same shapes. Counting one loop body, not the whole
kernel, means peeled iterations and the several copies of a body in the source (masked and
unmasked segments) do not count; what raises the ratio is work done more than once per
iteration, as when the tile has fewer 16-row (mma) / 64-row (wgmma) slices than warps and
Triton replicates the product on the spare warps, or a dim padded up to the instruction
shape. A spec fails at ratio >= DUP_MMA_LIMIT (2: twice the tensor-core work its dots
need, every iteration); 1 < ratio < 2 is reported only (e.g. one of two equal dots done
twice gives 1.5). Not handled: a loop Triton unrolls (tl.range(loop_unroll_factor)) would
read as duplication; a kernel whose loops hold no MMA is checked as one body (every MMA of
it runs once); a kernel without declared dots is not checked.

A spec may waive named problems (`KernelSpec.waive`, each with its reason): they are
reported, not failed. A module of KERNEL_MODULES that does not exist (yet) is skipped with
a note; an existing module that fails to import is an error.

Triton's interpreter cannot compile for a GPU and must be chosen before triton is
imported, so with TRITON_INTERPRET set the report re-runs itself in a child process
without it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

KERNEL_MODULES = [
    "attnkernels.softmax.triton_specs",
    "attnkernels.linear.triton_specs",
]
DEFAULT_ARCHS = (80, 90)
# the most dynamic shared memory one block may use (A100: 163 KB, H100: 227 KB); a kernel
# asking for more compiles but fails to launch ("out of resources")
SMEM_LIMIT = {80: 166912, 90: 232448}

# ----------------------------------------------------------------------------------------
# Parsers (pure text; unit-tested on canned ptxas / PTX output)
# ----------------------------------------------------------------------------------------

_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")
# instructions, not comments or labels: the opcode starts a statement (after whitespace or
# a predicate guard such as "@%p1 ")
_RE_MMA = re.compile(r"^\s*(?:@!?%\w+\s+)?mma\.sync\.", re.MULTILINE)
_RE_WGMMA = re.compile(r"^\s*(?:@!?%\w+\s+)?wgmma\.mma_async\.", re.MULTILINE)
# kind, shape and the A operand type of an MMA instruction (mma.sync: .f32.<a>.<b>.f32;
# wgmma: .f32.<a>.<b>)
_RE_MMA_SHAPE = re.compile(r"^\s*(?:@!?%\w+\s+)?(mma\.sync|wgmma\.mma_async)\.\S*?\.(m\d+n\d+k\d+)\S*?"
                           r"\.(?:f32|f16|s32)\.(f16|bf16|tf32|f64|e4m3|e5m2|s8|u8)\.", re.MULTILINE)
SIXTEEN_BIT = ("fp16", "bf16")
# problems a spec may waive with a reason (KernelSpec.waive); the others always fail
WAIVABLE = ("mma.sync-sm90", "tf32-16bit", "dup-mma")
# loops in PTX: a basic-block label, and a branch back to a label above it
_RE_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_RE_BRA = re.compile(r"^\s*(?:@!?%\w+\s+)?bra(?:\.uni)?\s+(\$L__BB\d+_\d+)\s*;")
# the dot products' work per loop body may exceed the minimum by this factor before the
# gate fails the spec ("dup-mma"); see `mma_per_body`
DUP_MMA_LIMIT = 2.0


@dataclasses.dataclass
class PtxasInfo:
    registers: int | None  # the max over the entry functions in the log
    spill_stores: int  # bytes, summed over functions
    spill_loads: int
    stack: int  # bytes of stack frame (local memory), summed

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def parse_ptxas_log(log: str) -> PtxasInfo:
    """Registers, spill bytes and stack frame from `ptxas -v` output (stderr)."""
    regs = [int(m) for m in _RE_REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _RE_SPILL.findall(log)]
    return PtxasInfo(
        registers=max(regs) if regs else None,
        spill_stores=sum(s for s, _ in spills),
        spill_loads=sum(l for _, l in spills),
        stack=sum(int(m) for m in _RE_STACK.findall(log)),
    )


def tensor_core_ops(ptx: str) -> dict[str, int]:
    """Counts of tensor-core matmul instructions in PTX text: {"mma": n, "wgmma": n}.

    `mma.sync` is the Ampere warp-level MMA (also valid on Hopper); `wgmma.mma_async`
    the Hopper warpgroup MMA. Fences, commit and wait instructions are not counted.
    """
    return {"mma": len(_RE_MMA.findall(ptx)), "wgmma": len(_RE_WGMMA.findall(ptx))}


def mma_shapes(ptx: str) -> dict[str, int]:
    """Counts of MMA instructions by kind, shape and operand type, e.g.
    {"wgmma.m64n128k16.bf16": 60, "mma.m16n8k8.tf32": 24}."""
    counts: dict[str, int] = {}
    for kind, shape, ty in _RE_MMA_SHAPE.findall(ptx):
        key = f"{'wgmma' if kind.startswith('wgmma') else 'mma'}.{shape}.{ty}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _mma_macs(key: str) -> int:
    """Multiply-adds of one instruction of a `mma_shapes` key ("wgmma.m64n128k16.bf16")."""
    m, n, k = map(int, re.match(r"\w+\.m(\d+)n(\d+)k(\d+)", key).groups())
    return m * n * k


def mma_cta_macs(shapes: dict[str, int], num_warps: int) -> int:
    """Multiply-adds that the CTA's tensor cores do for MMA instruction counts taken from PTX.

    PTX is the program of one thread, run by every warp: each `mma.sync` is issued by all
    `num_warps` warps, each `wgmma` by all `num_warps / 4` warpgroups. Work that two warps
    do on the same operands (a layout that replicates a dot over warps) is counted twice:
    that is what the duplicate-work check looks for."""
    total = 0
    for key, count in shapes.items():
        issuers = max(1, num_warps // 4) if key.startswith("wgmma") else num_warps
        total += count * _mma_macs(key) * issuers
    return total


def mma_loop_bodies(ptx: str) -> list[dict[str, int]]:
    """MMA instruction counts (`mma_shapes` keys) of each innermost loop of PTX that has MMAs.

    A loop is the text from a basic-block label to a branch back to it. Innermost: no other
    loop with MMAs lies inside it. One loop is one copy of a kernel's loop body as it runs
    per iteration, so peeled prologue/epilogue iterations and the several copies of a body
    in the source (masked and unmasked segments) do not add up here."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _RE_LABEL.match(line)
        if m:
            labels[m.group(1)] = i
    loops = []
    for j, line in enumerate(lines):
        m = _RE_BRA.match(line)
        if m and labels.get(m.group(1), j) < j:
            i = labels[m.group(1)]
            shapes = mma_shapes("\n".join(lines[i:j + 1]))
            if shapes:
                loops.append((i, j, shapes))
    inner = [(i, j, sh) for i, j, sh in loops
             if not any((i2, j2) != (i, j) and i <= i2 and j2 <= j for i2, j2, _ in loops)]
    return [sh for _, _, sh in inner]


def mma_per_body(ptx: str, num_warps: int, dots) -> dict | None:
    """Tensor-core work of the busiest loop body against the minimum its dots need.

    `dots`: the (M, N, K) of each tl.dot in one iteration of the kernel's loop (declared by
    the spec module's `AOT_DOTS`), or of the whole kernel where no loop holds a dot. The
    minimum is sum(M*N*K) multiply-adds per CTA; the measured is the busiest innermost
    loop's MMAs (`mma_loop_bodies`), or every MMA of a kernel whose loops hold none (each
    runs once: "loops" 0), times their shape times the warps / warpgroups that issue them
    (`mma_cta_macs`). ratio = measured / minimum: 1.0 when every product is computed once;
    2.0 when the work is done twice (e.g. warps laid along a dimension the tile does not
    have, so several warps compute the same tile). Counts are per thread, as in the PTX:
    "count" the measured instructions of that body, "min" the count at ratio 1 with the same
    instruction shapes. None without dots or without MMAs."""
    if not dots:
        return None
    bodies = mma_loop_bodies(ptx)
    if not bodies:
        whole = mma_shapes(ptx)
        if not whole:
            return None
        bodies = [whole]
        loops = 0
    else:
        loops = len(bodies)
    body = max(bodies, key=lambda sh: mma_cta_macs(sh, num_warps))
    macs = mma_cta_macs(body, num_warps)
    minimum = sum(m * n * k for m, n, k in dots)
    count = sum(body.values())
    ratio = macs / minimum
    return dict(count=count, min=-(-count * minimum // macs), ratio=round(ratio, 3), loops=loops)


def mma_problems(shapes: dict[str, int], arch: int, dtype: str, uses_dot: bool) -> list[str]:
    """What makes a kernel's MMAs slow: mma.sync in a 16-bit sm_90a kernel with a dot (a
    tile under 64 rows per warpgroup), TF32 MMAs on 16-bit inputs (fp32 operands)."""
    problems = []
    if dtype in SIXTEEN_BIT and uses_dot:
        if arch >= 90 and any(k.startswith("mma.") for k in shapes):
            problems.append("mma.sync-sm90")
        if any(k.endswith(".tf32") for k in shapes):
            problems.append("tf32-16bit")
    return problems


def has_tensor_cores(ops: dict[str, int], arch: int) -> bool:
    """sm_80 needs mma.sync; sm_90 accepts wgmma (preferred) or mma.sync."""
    if arch >= 90:
        return ops["wgmma"] > 0 or ops["mma"] > 0
    return ops["mma"] > 0


# ----------------------------------------------------------------------------------------
# Collecting specs
# ----------------------------------------------------------------------------------------


def _spec_dtype(spec) -> str:
    if getattr(spec, "dtype", ""):
        return spec.dtype
    for ty in spec.signature.values():
        if isinstance(ty, str) and ty.startswith("*"):
            return ty[1:]
    return "?"


def _kernel_name(spec) -> str:
    return getattr(spec.fn, "__name__", None) or spec.name.split("-")[0]


def collect_specs(modules=None, *, quick=False, filter_substr=None, log=print):
    """[(module name, spec)], and the notes about skipped modules. Raises on import errors
    of modules that exist."""
    specs, notes = [], []
    for mod_name in modules if modules is not None else KERNEL_MODULES:
        try:
            found = importlib.util.find_spec(mod_name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            note = f"{mod_name}: module not found, skipped (not written yet?)"
            notes.append(note)
            log(f"note: {note}")
            continue
        mod = importlib.import_module(mod_name)  # errors here must fail the gate
        mod_specs = getattr(mod, "AOT_SPECS", None)
        if mod_specs is None:
            raise RuntimeError(f"{mod_name}: has no AOT_SPECS list (see attnkernels.triton_common.KernelSpec)")
        names = [s.name for s in mod_specs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise RuntimeError(f"{mod_name}: duplicate AOT spec names {sorted(dup)}")
        chosen = list(mod_specs)
        if quick:
            # one spec per (kernel, dtype, archs): the one marked quick, else the first
            groups: dict[tuple, list] = {}
            for s in chosen:
                groups.setdefault((_kernel_name(s), _spec_dtype(s), getattr(s, "archs", None)), []).append(s)
            chosen = [next((s for s in group if getattr(s, "quick", False)), group[0]) for group in groups.values()]
        if filter_substr:
            chosen = [s for s in chosen if filter_substr in s.name]
        specs += [(mod_name, s) for s in chosen]
    return specs, notes


# ----------------------------------------------------------------------------------------
# Compiling one spec (runs in a worker process)
# ----------------------------------------------------------------------------------------


def ptxas_path() -> str:
    """The ptxas that ships in the triton wheel (TRITON_PTXAS_PATH overrides it)."""
    from triton import knobs

    return knobs.nvidia.ptxas.path


def ptxas_version() -> str:
    try:
        out = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unavailable ({exc})"
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def _run_ptxas(ptx: str, arch: int) -> str:
    """`ptxas -v` on the PTX, with the options Triton's own compile passes, so the numbers
    are those of the cubin Triton produced. Returns the log."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o", obj]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stderr + proc.stdout


def _tile_str(spec) -> str:
    """The constexpr tile sizes, e.g. "M32xN128" (BLOCK_D/BLOCK_DV, the padded head dims, not)."""
    c = spec.constexprs
    keys = [k for k in sorted(c) if k.startswith("BLOCK_") and isinstance(c[k], int) and k not in ("BLOCK_D", "BLOCK_DV")]
    return "x".join(f"{k.replace('BLOCK_', '')}{c[k]}" for k in keys)


def _config_str(spec) -> str:
    c = spec.constexprs
    parts = [f"{k.replace('BLOCK_', '')}{c[k]}" for k in sorted(c) if k.startswith("BLOCK_") and isinstance(c[k], int)]
    extra = [f"r{spec.maxnreg}"] if getattr(spec, "maxnreg", None) else []
    return " ".join(parts + [f"w{spec.num_warps}", f"s{spec.num_stages}"] + extra)


def _attrs(spec) -> dict:
    """KernelSpec.attrs (by argument name) in ASTSource's form: {(arg index,): [[attr, value]]}."""
    names = list(spec.signature)
    return {(names.index(name),): value for name, value in getattr(spec, "attrs", {}).items()}


def compile_one(mod_name: str, spec_name: str, arch: int) -> dict:
    """Compile one spec for one arch; never raises (errors are reported in the row)."""
    t0 = time.perf_counter()
    row = dict(module=mod_name, name=spec_name, arch=arch, kernel="?", dtype="?", config="", uses_dot=None,
               regs=None, spill_stores=None, spill_loads=None, spills=None, stack=None, smem=None,
               mma=0, wgmma=0, mma_shapes={}, tensor_cores=None, status="error", error=None, waived=[],
               num_warps=None, num_stages=None, tile="", mma_body=None)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        mod = importlib.import_module(mod_name)
        spec = next(s for s in mod.AOT_SPECS if s.name == spec_name)
        dots = getattr(mod, "AOT_DOTS", {}).get(spec_name)  # optional: (M, N, K) per dot of the loop body
        row.update(kernel=_kernel_name(spec), dtype=_spec_dtype(spec), config=_config_str(spec), uses_dot=spec.uses_dot,
                   num_warps=spec.num_warps, num_stages=spec.num_stages, tile=_tile_str(spec))
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, _attrs(spec))
        options = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
        if getattr(spec, "maxnreg", None):
            options["maxnreg"] = spec.maxnreg
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = kernel.asm["ptx"]
        info = parse_ptxas_log(_run_ptxas(ptx, arch))
        ops = tensor_core_ops(ptx)
        tc = has_tensor_cores(ops, arch)
        shapes = mma_shapes(ptx)
        body = mma_per_body(ptx, spec.num_warps, dots) if spec.uses_dot else None
        row.update(regs=info.registers, spill_stores=info.spill_stores, spill_loads=info.spill_loads,
                   spills=info.spills, stack=info.stack, smem=int(kernel.metadata.shared),
                   mma=ops["mma"], wgmma=ops["wgmma"], mma_shapes=shapes, tensor_cores=tc, mma_body=body)
        problems = []
        if info.spills:
            problems.append("spill")
        if row["smem"] > SMEM_LIMIT.get(arch, row["smem"]):
            problems.append("smem")
        if spec.uses_dot and not tc:
            problems.append("no-mma")
        waive = dict(getattr(spec, "waive", ()) or ())
        found = mma_problems(shapes, arch, row["dtype"], spec.uses_dot)
        if body and body["ratio"] >= DUP_MMA_LIMIT:
            found.append("dup-mma")
        for problem in found:
            if problem in waive:
                row["waived"].append(f"{problem}: {waive[problem]}")
            else:
                problems.append(problem)
        row["status"] = ",".join(problems) if problems else ("ok (waived)" if row["waived"] else "ok")
    except Exception as exc:  # noqa: BLE001 - a compile error is a result to report
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:800]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------

def _mma_cell(row) -> str:
    if row["tensor_cores"] is None:
        return "?"
    kinds = " ".join(f"{k} x{n}" for k, n in row.get("mma_shapes", {}).items()) or \
        "+".join(k for k in ("wgmma", "mma") if row[k])
    if not row["uses_dot"]:
        return f"({kinds})" if kinds else "-"  # not required: no dot, or exact-fp32 dots
    return kinds if row["tensor_cores"] else "NO"


def _cells(row) -> list[str]:
    arch = f"sm_{row['arch']}" + ("a" if row["arch"] >= 90 else "")
    fmt = lambda v: "?" if v is None else str(v)  # noqa: E731
    spills = fmt(row["spills"]) if not row["spills"] else f"{row['spill_stores']}/{row['spill_loads']}B"
    status = row["status"] if row["status"] != "error" else "ERROR"
    body = row.get("mma_body")
    body = "-" if not body else f"{body['count']} ({body['min']}) {body['ratio']:g}x"
    return [row["name"], row["config"], arch, fmt(row["regs"]), spills, fmt(row["smem"]), _mma_cell(row), body, status]


def format_table(rows, markdown=False) -> str:
    header = ["kernel", "config", "arch", "regs", "spills", "smem (B)", "MMA (kind.shape.type x count)",
              "MMA/loop body (min) ratio", "status"]
    body = [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in body])


def summarize(rows) -> dict:
    return dict(
        compiles=len(rows),
        specs=len({(r["module"], r["name"]) for r in rows}),
        errors=sum(r["status"] == "error" for r in rows),
        spills=sum(bool(r["spills"]) for r in rows),
        missing_tensor_cores=sum("no-mma" in r["status"] for r in rows),
        smem_over_limit=sum("smem" in r["status"] for r in rows),
        mma_sync_sm90=sum("mma.sync-sm90" in r["status"] for r in rows),
        tf32_16bit=sum("tf32-16bit" in r["status"] for r in rows),
        dup_mma=sum("dup-mma" in r["status"] for r in rows),
        mma_checked=sum(bool(r.get("mma_body")) for r in rows),
        waived=sum(bool(r.get("waived")) for r in rows),
        max_regs=max((r["regs"] for r in rows if r["regs"] is not None), default=None),
        max_smem=max((r["smem"] for r in rows if r["smem"] is not None), default=None),
    )


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m attnkernels.tools.compile_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities (80 90)")
    p.add_argument("--json", metavar="PATH", help="also write every row and the summary as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--quick", action="store_true", help="one spec per kernel per dtype")
    p.add_argument("--filter", metavar="SUBSTR", help="only specs whose name contains SUBSTR")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    return p.parse_args(argv)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _rerun_without_interpreter(argv) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print("note: TRITON_INTERPRET is set; re-running the compile report in a child process without it",
          file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, "-m", "attnkernels.tools.compile_report", *argv], env=env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if _interpreter_on():
        return _rerun_without_interpreter(argv)
    out = sys.stdout
    log = (lambda msg: print(msg, file=sys.stderr)) if args.markdown else print  # markdown stdout stays a table
    path = ptxas_path()
    if not os.path.exists(path):
        print(f"compile_report: ptxas not found at {path}; the triton wheel ships it under backends/nvidia/bin",
              file=sys.stderr)
        return 2

    import triton

    # the toolchain first: an H200 run once used a different one than CI, and nobody could tell
    log(f"triton {triton.__version__}, ptxas {ptxas_version()} ({path})")
    t0 = time.perf_counter()
    specs, notes = collect_specs(quick=args.quick, filter_substr=args.filter, log=log)
    tasks = [(m, s.name, arch) for m, s in specs for arch in args.arch
             if getattr(s, "archs", None) is None or arch in s.archs]
    jobs = max(1, min(args.jobs, len(tasks) or 1))
    log(f"compiling {len(specs)} specs x {len(args.arch)} archs = {len(tasks)} compiles with {jobs} processes")
    rows = [None] * len(tasks)

    def progress(i, row):
        rows[i] = row
        done = sum(r is not None for r in rows)
        print(f"[{done}/{len(tasks)}] {row['name']} sm_{row['arch']}: {row['status']} ({row['seconds']} s)",
              file=sys.stderr, flush=True)

    if jobs == 1:
        for i, t in enumerate(tasks):
            progress(i, compile_one(*t))
    else:
        # fork shares the already imported modules; workers look the spec up by name, so a
        # spawn context would work too (nothing unpicklable crosses the process boundary)
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(compile_one, *t): i for i, t in enumerate(tasks)}
            for fut in concurrent.futures.as_completed(futures):
                progress(futures[fut], fut.result())
    elapsed = time.perf_counter() - t0
    summary = summarize(rows)
    summary["seconds"] = round(elapsed, 1)
    ok = not (summary["errors"] or summary["spills"] or summary["missing_tensor_cores"] or summary["smem_over_limit"]
              or summary["mma_sync_sm90"] or summary["tf32_16bit"] or summary["dup_mma"])

    print(format_table(rows, markdown=args.markdown), file=out)
    for r in rows:
        if r["error"]:
            print(f"\nERROR {r['name']} sm_{r['arch']}: {r['error']}", file=out)
    tail = (f"{summary['specs']} specs, {summary['compiles']} compiles (sm_{', sm_'.join(map(str, args.arch))}) "
            f"in {elapsed:.0f} s: {summary['errors']} errors, {summary['spills']} with spills, "
            f"{summary['missing_tensor_cores']} dot kernels without tensor cores, "
            f"{summary['smem_over_limit']} over the shared-memory limit, "
            f"{summary['mma_sync_sm90']} 16-bit sm_90a kernels on mma.sync, {summary['tf32_16bit']} with TF32 MMAs on "
            f"16-bit inputs, {summary['dup_mma']} of {summary['mma_checked']} checked with >= {DUP_MMA_LIMIT:g}x "
            f"the minimum MMA work per loop body ({summary['waived']} waived); max {summary['max_regs']} regs, "
            f"max {summary['max_smem']} B shared. triton {triton.__version__}, ptxas {ptxas_version()}.")
    print(("\n" if args.markdown else "\n") + tail + ("" if ok else " FAILED"), file=out)
    waived = {}
    for r in rows:
        for w in r.get("waived") or ():
            waived.setdefault(w, []).append(f"{r['name']} sm_{r['arch']}")
    for w, where in waived.items():
        print(f"\nwaived {w} ({len(where)} compiles, e.g. {where[0]})", file=out)
    for note in notes:
        print(f"\nnote: {note}" if not args.markdown else f"\n_note: {note}_", file=out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ok=ok, summary=summary, archs=args.arch, quick=args.quick, filter=args.filter,
                           skipped_modules=notes, triton=triton.__version__, ptxas=ptxas_version(),
                           results=rows), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
