"""Per-loop PTX instruction counts (setp, selp, mma) of one AOT spec, e.g. the masked vs unmasked
tile loops of the softmax kernels:

    python benchmarks/ptx_loops.py ROOT MODULE SPEC_NAME ARCH

(ROOT: the repository to import from; MODULE: a triton_specs module.)"""
import importlib, re, sys
root, mod, name, arch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, root)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = next(s for s in importlib.import_module(mod).AOT_SPECS if s.name == name)
names = list(spec.signature)
attrs = {(names.index(n),): v for n, v in spec.attrs.items()}
opts = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
if spec.maxnreg: opts["maxnreg"] = spec.maxnreg
k = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=opts)
lines = k.asm["ptx"].splitlines()
label_at = {}
instr = []  # (line index, text) of instructions
for i, l in enumerate(lines):
    t = l.strip()
    m = re.match(r"^(\$L__\w+):", t)
    if m:
        label_at[m.group(1)] = i
loops = []
for i, l in enumerate(lines):
    m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", l)
    if m and m.group(1) in label_at and label_at[m.group(1)] < i:
        loops.append((label_at[m.group(1)], i))
def count(a, b):
    body = [lines[j].strip() for j in range(a, b + 1)]
    body = [t for t in body if t and not t.startswith(("//", "$", "{", "}", ".loc", ".file", ".reg", ".shared", ".local"))]
    ops = lambda p: sum(1 for t in body if re.match(r"^(@!?%p\d+\s+)?" + p, t))
    return len(body), ops(r"setp\."), ops(r"selp\."), ops(r"(mma\.sync|wgmma\.mma_async)")
inner = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops if (c, d) != (a, b))]
tot = count(0, len(lines) - 1)
print(f"{name} sm_{arch}: total instr {tot[0]}, setp {tot[1]}, selp {tot[2]}, mma {tot[3]}; {len(loops)} loops, {len(inner)} innermost")
for a, b in loops:
    n, setp, selp, mma = count(a, b)
    kind = "inner" if (a, b) in inner else "outer"
    print(f"  loop {lines[a].strip()[:-1]:<14} {kind}: {n:5d} instr, setp {setp:3d}, selp {selp:3d}, mma {mma:3d}")
