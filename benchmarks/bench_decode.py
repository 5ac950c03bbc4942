"""One decode step against a KV cache on CPU vs SDPA(enable_gqa=True), and the bytes floor.

Full: Hq=32, Hk=8, D=128, Nq=1, B in {1, 8}, Nk in {4096, 32768, 131072} (B=8 at
131072 is skipped: 4 GB per tensor in fp32), fp32 and bf16. Target (issue 14):
>= 1.5x SDPA. Decoding is memory-bound: the step reads K and V once, so next to the
speed-up we record GB/s = (K + V bytes) / time, and the same for a copy of K into a
preallocated buffer (it reads K and writes as many bytes: the same traffic, and no
first-touch page faults, which make `k.clone()` of a GB-sized cache several times slower)
timed in the same interleaved rounds.
"""
import pytest
import torch
import torch.nn.functional as F

import attnkernels

from .common import DTYPES, compare, sizes, timed_call

Q_HEADS, KV_HEADS, HEAD_DIM = sizes(full=(32, 8, 128), quick=(8, 2, 64))
CASES = sizes(full=[(1, 4096), (8, 4096), (1, 32768), (8, 32768), (1, 131072)], quick=[(1, 512)])


@pytest.mark.parametrize("batch,kv_len", CASES, ids=[f"B{b}-Nk{n}" for b, n in CASES])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decode_step_vs_sdpa(benchmark, batch, kv_len, dtype):
    torch.manual_seed(0)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, dtype=dtype)
    k, v = (torch.randn(batch, KV_HEADS, kv_len, HEAD_DIM, dtype=dtype) for _ in range(2))
    ours = timed_call(lambda q, k, v: attnkernels.attention(q, k, v), (q, k, v), False)
    peers = {
        "sdpa_gqa": timed_call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), (q, k, v), False),
        "copy_same_bytes": timed_call(lambda k, buf: buf.copy_(k), (k, torch.empty_like(k)), False),
    }
    flops = 4.0 * batch * Q_HEADS * kv_len * HEAD_DIM  # Q Kᵀ and P V, 2 flops per multiply-add
    benchmark.group = f"decode-B{batch}-Nk{kv_len}-{dtype}"
    info = compare(benchmark, ours, peers, flops, dtype=dtype)
    kv_bytes = 2 * k.numel() * k.element_size()
    info["gbps"] = kv_bytes / (info["ours_ms"] * 1e-3) / 1e9
    info["copy_gbps"] = kv_bytes / (info["copy_same_bytes_ms"] * 1e-3) / 1e9
    benchmark.extra_info.update(gbps=info["gbps"], copy_gbps=info["copy_gbps"])
    assert info["ours_ms"] > 0
