"""benchmarks.report's bookkeeping without timing: `--update` merges re-measured sections into saved
rows, `--render --tables-only` writes a focused document (no plots, no GPU sections)."""
import json

from benchmarks import report


def _row(family: str, dtype: str, label: str, ms: float) -> dict:
    return dict(family=family, dtype=dtype, label=label, direction="fwd", ours_ms=ms, ours_min_ms=ms, ours_max_ms=ms,
                gflops=1.0, fraction_of_mm=0.5, ours_mem_mb=0.0, peers={}, mm_gflops=100.0)


def _saved() -> dict:
    meta = dict(quick=True, date="2026-01-01", machine="x86_64", cores=2, threads=1, torch="t", triton="tr",
                python="p", capability="AVX512", build="avx512", mm_gflops={"fp32": 100.0})
    rows = [_row("dense", "fp32", "N=1", 1.0), _row("decode", "fp32", "old-a", 2.0), _row("decode", "fp32", "old-b", 3.0),
            _row("decode", "bf16", "kept", 4.0), _row("window", "fp32", "N=2", 5.0)]
    return dict(meta=meta, gate={"dense": 1e-7}, rows=rows)


def test_update_replaces_only_the_measured_sections_in_place():
    saved = _saved()
    new = [_row("decode", "fp32", "new", 9.0), _row("varlen", "fp32", "added", 7.0)]
    merged = report._merge_rows(saved, new, dict(date="2026-02-02", build="avx512"))
    assert [r["label"] for r in merged] == ["N=1", "new", "kept", "N=2", "added"]
    assert saved["meta"]["updates"] == [dict(date="2026-02-02", sections=["decode, fp32", "varlen, fp32"],
                                             build="avx512")]
    text = report.markdown(saved["meta"], saved["gate"], merged, "", [])
    assert "re-measured on 2026-02-02 with `--update`" in text and "decode, fp32; varlen, fp32" in text


def test_update_refuses_other_flags_than_the_saved_run(tmp_path, capsys):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(_saved()))
    try:
        report.main(["--update", str(path), "--families", "decode", "--threads", "2"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--update with other --threads than the saved run must be refused")
    assert "re-measure with the same flags" in capsys.readouterr().err


def test_render_tables_only_has_no_plots_or_gpu_sections(tmp_path):
    path, out = tmp_path / "rows.json", tmp_path / "doc.md"
    path.write_text(json.dumps(_saved()))
    assert report.main(["--render", str(path), "--tables-only", "--output", str(out)]) == 0
    text = out.read_text()
    assert "## decode, bf16" in text and "| kept |" in text
    assert "![" not in text and "GPU" not in text
