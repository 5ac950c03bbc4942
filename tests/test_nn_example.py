"""examples/train_tiny_lm.py runs end to end (a few steps, small shapes) and writes its plot."""
import importlib.util
import math
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_tiny_lm.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_smoke_B4_N32_steps8(tmp_path):
    pytest.importorskip("matplotlib", reason="the example plots with matplotlib")
    example = _load()
    out = tmp_path / "loss.png"
    results = example.main(["--steps", "8", "--families", "dense", "window", "bigbird", "--batch", "4",
                            "--seq-len", "32", "--backend", "reference", "--out", str(out)])
    assert set(results) == {"dense", "window", "bigbird"}
    for family, r in results.items():
        assert len(r["loss"]) == 8 and all(math.isfinite(x) for x in r["loss"]), family
        assert sum(r["loss"][-3:]) / 3 < r["loss"][0], f"{family}: the loss did not go down at all"
    assert out.stat().st_size > 10_000


def test_copy_batches_second_copies_repeat_first():
    example = _load()
    ids, is_copy = next(example.copy_batches(2, 20, 16, 4, seed=0))
    assert ids.shape == is_copy.shape == (2, 20)
    assert (ids[:, 4:8] == ids[:, 0:4]).all() and is_copy[0, 4:8].all() and not is_copy[0, :4].any()
