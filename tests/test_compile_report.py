"""The ahead-of-time GPU compile gate (`python -m attnkernels.tools.compile_report`).

The report compiles each kernel for sm_80 and sm_90a without a GPU, in its own process
(the test session runs under TRITON_INTERPRET=1, which cannot compile for a GPU). Here:
the full gate passes (every spec: no compile error, no spill, tensor cores wherever a
kernel's matmuls must use them, no duplicated MMA work unless waived), and its parsers
catch a spill, a missing mma and duplicated MMA work on canned text. The full gate takes
about 7.5 minutes on 2 cores from a cold Triton cache (950 compiles); it uses every core.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attnkernels.tools import compile_report as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_missing() -> str | None:
    try:
        path = R.ptxas_path()
    except Exception as exc:  # noqa: BLE001 - no triton / no nvidia backend
        return f"cannot locate ptxas: {exc}"
    return None if os.path.exists(path) else f"ptxas not found at {path}"


# ----------------------------------------------------------------------------------------
# parsers, on canned text
# ----------------------------------------------------------------------------------------

PTXAS_CLEAN = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'attn_fwd' for 'sm_80'
ptxas info    : Function properties for attn_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 464 bytes cmem[0]
ptxas info    : Compile time = 412.002 ms
"""

PTXAS_SPILL = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'attn_bwd_dkdv' for 'sm_90a'
ptxas info    : Function properties for attn_bwd_dkdv
    488 bytes stack frame, 508 bytes spill stores, 780 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 488 bytes cumulative stack size
ptxas info    : Compile time = 624.376 ms
"""

PTX_MMA = """\
.target sm_80
	// begin inline asm
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 { %r1, %r2, %r3, %r4 }, { %r5 }, { %r6 }, { %r7 };
	@%p3 mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 { %r1, %r2, %r3, %r4 }, { %r5 }, { %r6 }, { %r7 };
"""

PTX_WGMMA = """\
.target sm_90a
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 0;
"""

# a kernel whose dot was lowered to FMAs: no tensor-core instruction, only words that look like one
PTX_NO_MMA = """\
.target sm_80
	// mma.sync would be here on a tensor-core path
	fma.rn.f32 	%f3, %f1, %f2, %f3;
	wgmma.fence.sync.aligned;
$L__mma_sync_label:
"""


PTX_SHAPES = """\
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
	mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 { %f1 }, { %r5 }, { %r6 }, { %f7 };
	wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 {%f1}, %rd1, %rd2, 1, 1;
"""


def test_mma_shapes_and_the_checks_on_them():
    shapes = R.mma_shapes(PTX_SHAPES)
    assert shapes == {"mma.m16n8k8.tf32": 1, "wgmma.m64n128k16.bf16": 2, "wgmma.m64n32k8.tf32": 1}
    assert R.mma_shapes(PTX_MMA) == {"mma.m16n8k16.f16": 2}
    # mma.sync in a 16-bit sm_90a kernel, tf32 on 16-bit inputs; neither on fp32 / sm_80
    assert R.mma_problems(shapes, 90, "bf16", True) == ["mma.sync-sm90", "tf32-16bit"]
    assert R.mma_problems(R.mma_shapes(PTX_MMA), 80, "fp16", True) == []
    assert R.mma_problems(shapes, 90, "tf32", True) == []
    assert R.mma_problems({"wgmma.m64n128k16.bf16": 2}, 90, "bf16", True) == []
    row = dict(module="m", name="k", status="mma.sync-sm90", spills=0, smem=0, regs=100, waived=[])
    assert R.summarize([row])["mma_sync_sm90"] == 1


# a kernel as Triton lays it out: one MMA before the loops (a peeled iteration), a loop of
# two bodies' worth of nothing but a nested loop, the nested loop with 4 MMAs per iteration,
# and a second copy of the body (the unmasked segment) with 4 more
PTX_LOOPS = """\
.target sm_80
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1 }, { %r5 }, { %r6 }, { %f7 };
$L__BB0_1:                              // =>This Loop Header: Depth=1
	add.s32 	%r1, %r1, 1;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=2
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1 }, { %r5 }, { %r6 }, { %f7 };
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1 }, { %r5 }, { %r6 }, { %f7 };
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1 }, { %r5 }, { %r6 }, { %f7 };
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1 }, { %r5 }, { %r6 }, { %f7 };
	@%p3 bra 	$L__BB0_2;
	@%p4 bra 	$L__BB0_1;
	bra.uni 	$L__BB0_4;
$L__BB0_3:
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1 }, { %r5 }, { %r6 }, { %f7 };
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1 }, { %r5 }, { %r6 }, { %f7 };
	@!%p5 bra 	$L__BB0_3;
$L__BB0_4:
	ret;
"""

PTX_WGMMA_LOOP = """\
.target sm_90a
$L__BB0_7:
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 1, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 1, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 1, 1, 1, 0, 1;
	wgmma.wait_group.sync.aligned 0;
	@%p9 bra 	$L__BB0_7;
"""


def test_mma_loop_bodies_count_each_innermost_loop():
    # the outer loop (BB0_1) holds the inner one: only the inner is a body; the peeled MMA
    # before the loops and the forward branch to BB0_4 count nowhere
    assert R.mma_loop_bodies(PTX_LOOPS) == [{"mma.m16n8k16.bf16": 4}, {"mma.m16n8k16.bf16": 2}]
    assert R.mma_loop_bodies(PTX_MMA) == []  # no loop
    assert R.mma_cta_macs({"mma.m16n8k16.bf16": 4}, 4) == 4 * 16 * 8 * 16 * 4  # every warp issues it
    # a wgmma is issued once per warpgroup: 8 warps = 2 issuers
    assert R.mma_cta_macs({"wgmma.m64n64k16.bf16": 2, "wgmma.m64n128k16.bf16": 1}, 8) == \
        (2 * 64 * 64 * 16 + 64 * 128 * 16) * 2


def test_mma_per_body_against_the_declared_dots():
    # 4 warps x 4 m16n8k16 (the busiest body) = 32768 MACs = one [64, 16] x [16, 32] dot: the minimum
    assert R.mma_per_body(PTX_LOOPS, 4, [(64, 32, 16)]) == dict(count=4, min=4, ratio=1.0, loops=2)
    # the same PTX on 8 warps does that dot twice: warps replicated along a missing dimension
    body = R.mma_per_body(PTX_LOOPS, 8, [(64, 32, 16)])
    assert body["ratio"] == 2.0 and body["min"] == 2
    # sm_90a, 8 warps: (2*64*64*16 + 64*128*16)*2 = 524288 MACs; [128, 64] x [64, 32] is 262144
    assert R.mma_per_body(PTX_WGMMA_LOOP, 8, [(128, 64, 32), (128, 32, 64)])["ratio"] == 1.0
    assert R.mma_per_body(PTX_WGMMA_LOOP, 8, [(128, 64, 32)])["ratio"] == 2.0
    # no loop holds an MMA: the whole kernel is the body, each MMA run once. 2 m16n8k16 on 4
    # warps = 16384 MACs, 4x one [16, 16] x [16, 16] dot; 4 of them need exactly that
    assert R.mma_per_body(PTX_MMA, 4, [(16, 16, 16)]) == dict(count=2, min=1, ratio=4.0, loops=0)
    assert R.mma_per_body(PTX_MMA, 4, [(16, 16, 16)] * 4)["ratio"] == 1.0
    assert R.mma_per_body(PTX_NO_MMA, 4, [(16, 16, 16)]) is None  # no MMA: nothing to compare
    assert R.mma_per_body(PTX_LOOPS, 4, None) is None  # no declared dots: not checked
    row = dict(module="m", name="k", status="dup-mma", spills=0, smem=0, regs=100, waived=[],
               mma_body=dict(count=4, min=2, ratio=2.0, loops=2))
    s = R.summarize([row])
    assert s["dup_mma"] == 1 and s["mma_checked"] == 1


def test_ptxas_parser_reads_registers_and_spills():
    clean = R.parse_ptxas_log(PTXAS_CLEAN)
    assert (clean.registers, clean.spills, clean.stack) == (168, 0, 0)
    spill = R.parse_ptxas_log(PTXAS_SPILL)
    assert spill.registers == 255
    assert (spill.spill_stores, spill.spill_loads, spill.spills, spill.stack) == (508, 780, 1288, 488)


def test_tensor_core_parser():
    assert R.tensor_core_ops(PTX_MMA) == {"mma": 2, "wgmma": 0}
    assert R.tensor_core_ops(PTX_WGMMA) == {"mma": 0, "wgmma": 1}
    assert R.tensor_core_ops(PTX_NO_MMA) == {"mma": 0, "wgmma": 0}
    assert R.has_tensor_cores(R.tensor_core_ops(PTX_MMA), 80)
    assert not R.has_tensor_cores(R.tensor_core_ops(PTX_WGMMA), 80)  # wgmma does not exist on sm_80
    assert R.has_tensor_cores(R.tensor_core_ops(PTX_WGMMA), 90)
    assert R.has_tensor_cores(R.tensor_core_ops(PTX_MMA), 90)  # mma.sync is valid on Hopper too
    assert not R.has_tensor_cores(R.tensor_core_ops(PTX_NO_MMA), 90)


def test_gate_fails_a_spill_and_a_missing_mma():
    """The status a row gets, and the summary's verdict, from the parsed numbers."""
    row = dict(status="spill", spills=12, spill_stores=8, spill_loads=4, regs=255, smem=0, arch=80, name="k",
               config="", module="m", uses_dot=True, tensor_cores=True, mma=3, wgmma=0)
    s = R.summarize([row, dict(row, status="no-mma", spills=0, tensor_cores=False, mma=0)])
    assert s["spills"] == 1 and s["missing_tensor_cores"] == 1 and s["smem_over_limit"] == 0
    assert "spill" in R.format_table([row]) and "NO" in R.format_table([dict(row, tensor_cores=False, mma=0)])


def test_quick_subset_is_one_spec_per_kernel_and_dtype():
    specs, notes = R.collect_specs(["attnkernels.softmax.triton_specs", "attnkernels.softmax.not_a_module"],
                                   quick=True, log=lambda msg: None)
    keys = [(s.fn.__name__, s.dtype, s.archs) for _, s in specs]
    assert len(keys) == len(set(keys)) and len(keys) >= 12
    # a kernel whose tiles differ per arch has one spec per arch, each compiled for its own
    archs = {(s.fn.__name__, s.dtype): set() for _, s in specs}
    for _, s in specs:
        archs[s.fn.__name__, s.dtype] |= set(s.archs or (80, 90))
    assert all(a == {80, 90} for a in archs.values()), archs
    assert any("not_a_module" in n for n in notes)  # a module not written yet is skipped, with a note


# ----------------------------------------------------------------------------------------
# the report itself, in a subprocess without the interpreter
# ----------------------------------------------------------------------------------------


def test_compile_report_full(tmp_path):
    reason = _ptxas_missing()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    out_json = tmp_path / "report.json"
    # TRITON_INTERPRET stays set on purpose: the report must re-run itself without it
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "attnkernels.tools.compile_report", "--jobs", str(os.cpu_count() or 2),
         "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, f"compile report failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out_json.read_text())
    rows = report["results"]
    assert report["ok"] and rows
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        where = f"{r['name']} sm_{r['arch']}"
        assert r["status"] in ("ok", "ok (waived)") and r["error"] is None, where
        assert r["tile"] and r["num_warps"] and r["num_stages"], where  # what the report shows per spec
        assert r["spills"] == 0, where
        assert r["regs"] is not None and 0 < r["regs"] <= 255, where
        if r["uses_dot"]:
            if r["arch"] == 80:
                assert r["mma"] > 0, f"{where}: no mma.sync"
            else:
                assert r["wgmma"] > 0 or r["mma"] > 0, f"{where}: no wgmma/mma"
                if r["dtype"] in ("fp16", "bf16") and not r["waived"]:
                    assert r["mma"] == 0 and r["wgmma"] > 0, f"{where}: mma.sync in a 16-bit sm_90a kernel"
    # the whole gate, not a subset
    specs, _ = R.collect_specs(log=lambda msg: None)
    assert not report["quick"] and report["summary"]["specs"] == len(specs)
    # the MMA-work check ran on every attention kernel with tensor-core dots
    for r in rows:
        if r["uses_dot"]:
            assert r["mma_body"] and r["mma_body"]["ratio"] >= 1.0, f"{r['name']} sm_{r['arch']}"
    assert "ptxas" in proc.stderr.splitlines()[0] or "ptxas" in proc.stdout, "the versions are printed"
    # every kernel of the attention module is represented, in each arch
    kernels = {(r["kernel"], r["arch"]) for r in rows if r["module"] == "attnkernels.softmax.triton_specs"}
    assert kernels == {(k, a) for k in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_preprocess",
                                        "attn_decode", "attn_decode_combine") for a in (80, 90)}
