"""The eager call path (op_call.EagerOp): a plain eager CPU call runs an op's implementation directly,
under an autograd.Function made of the op's own setup_context / backward; anything else goes through
the torch.library op. Both must give the same results, bit for bit (one implementation), and the op
must still be what a dispatch mode, FakeTensorMode or torch.compile sees.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkernels
from attnkernels import PerformerFeatures, attention_with_kvcache, linear_attention
from attnkernels.linear import favor as favor_module
from attnkernels.linear import ops as linear_ops
from attnkernels.softmax import kvcache as kvcache_module
from attnkernels.softmax import ops as softmax_ops


class _Recorder(TorchDispatchMode):
    """Passes every op through, recording its name: under it a call must take the torch.library op."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _run_both(fn, inputs):
    """(outputs, grads) of fn(*inputs) eagerly and under _Recorder (the op path), and the ops it saw."""
    results = []
    recorder = _Recorder()
    for mode in (None, recorder):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        if mode is None:
            out = fn(*leaves)
        else:
            with mode:
                out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        differentiable = [t for t in leaves if t.requires_grad]
        grads = ()
        if differentiable:
            weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)
                       for i, o in enumerate(outs)]
            loss = sum((o * w).sum() for o, w in zip(outs, weights))
            if mode is None:
                grads = torch.autograd.grad(loss, differentiable)
            else:
                with mode:
                    grads = torch.autograd.grad(loss, differentiable)
        results.append(([o.detach() for o in outs], grads))
    return results, recorder.seen


def _assert_same(results):
    (eager_outs, eager_grads), (op_outs, op_grads) = results
    for a, b in zip(eager_outs + list(eager_grads), op_outs + list(op_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _qkv(b, hq, hk, nq, nk, d, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
            for h, n in ((hq, nq), (hk, nk), (hk, nk))]


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_softmax_B2_H4_N97_D64_same_on_both_paths(causal):
    q, k, v = _qkv(2, 4, 2, 97, 97, 64)
    results, seen = _run_both(lambda q, k, v: attnkernels.attention(q, k, v, causal=causal), [q, k, v])
    _assert_same(results)
    assert {"attnkernels.attention_fwd", "attnkernels.attention_bwd"} <= seen


def test_softmax_bias_and_sinks_grads_B2_Hq4_Hk2_Nq13_Nk21_D16_same_on_both_paths():
    """The GRAD_FIELDS reach their gradients through the eager Function as through the op."""
    q, k, v = _qkv(2, 4, 2, 13, 21, 16, dtype=torch.float64)
    bias = torch.randn(1, 4, 13, 21, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    results, seen = _run_both(
        lambda q, k, v, bias, sinks: attnkernels.attention(q, k, v, attn_bias=bias, sinks=sinks, causal=True),
        [q, k, v, bias, sinks])
    _assert_same(results)
    assert len(results[0][1]) == 5 and all(g is not None for g in results[0][1])
    assert "attnkernels.attention_fwd" in seen


def test_softmax_decode_and_block_sparse_B1_H4_N128_D32_same_on_both_paths():
    q1, k, v = _qkv(1, 4, 4, 1, 128, 32)
    _assert_same(_run_both(lambda q, k, v: attnkernels.attention(q, k, v), [q1, k, v])[0])
    q, k, v = _qkv(1, 4, 4, 128, 128, 32)
    mask = attnkernels.masks.bigbird(128, block_size=32, num_global_blocks=1, num_window_blocks=1,
                                     num_random_blocks=1, num_heads=4, seed=0)
    _assert_same(_run_both(lambda q, k, v: attnkernels.sparse_attention(q, k, v, mask), [q, k, v])[0])


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_linear_B2_Hq4_Hk2_N37_D16_with_state_same_on_both_paths(causal):
    q, k, v = _qkv(2, 4, 2, 37, 37, 16)
    state = (torch.rand(2, 2, 16, 16), torch.rand(2, 2, 16))

    def fn(q, k, v):
        out, (s, z) = linear_attention(q, k, v, causal=causal, initial_state=state, return_final_state=True)
        return out, s, z

    results, seen = _run_both(fn, [q, k, v])
    _assert_same(results)
    assert {"attnkernels.linear_attention_fwd", "attnkernels.linear_attention_bwd"} <= seen


def test_favor_B2_H4_N33_D16_same_on_both_paths():
    features = PerformerFeatures(16, 32, seed=0)
    q, k, v = _qkv(2, 4, 4, 33, 33, 16)
    results, seen = _run_both(lambda q, k, v: linear_attention(q, k, v, feature_map=features), [q, k, v])
    _assert_same(results)
    assert {"attnkernels.favor_attention_fwd", "attnkernels.favor_attention_bwd"} <= seen


def test_kvcache_B2_Hq4_Hk2_Nq3_D16_same_on_both_paths():
    q = torch.randn(2, 4, 3, 16)
    lens = torch.tensor([5, 17], dtype=torch.int32)
    results = []
    for mode in (None, _Recorder()):
        k_cache, v_cache = torch.zeros(2, 2, 32, 16), torch.zeros(2, 2, 32, 16)
        k_new, v_new = torch.ones(2, 2, 3, 16), torch.full((2, 2, 3, 16), 2.0)
        with mode if mode is not None else torch.no_grad():
            out, lse = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, k_new=k_new, v_new=v_new,
                                              causal=True, return_lse=True)
        results.append((out, lse, k_cache, v_cache))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "attnkernels.attention_kvcache_fwd" in mode.seen


def _refuse(*args, **kwargs):
    raise AssertionError("the torch.library op was called on the plain eager path")


def test_plain_eager_calls_skip_the_ops(monkeypatch):
    """In a plain eager CPU call (grad or not) no op wrapper runs: the per-call cost the path removes."""
    for eager_op in (softmax_ops._attention_fwd, softmax_ops._attention_bwd, linear_ops._linear_attention_fwd,
                     linear_ops._linear_attention_bwd, favor_module._favor_attention_fwd,
                     favor_module._favor_attention_bwd, kvcache_module._attention_kvcache_fwd):
        monkeypatch.setattr(eager_op, "op", _refuse)
    q, k, v = _qkv(1, 2, 2, 9, 9, 16)
    attnkernels.attention(q, k, v, causal=True).sum().backward()
    linear_attention(q, k, v, causal=True).sum().backward()
    linear_attention(q, k, v, feature_map=PerformerFeatures(16, 8, seed=0)).sum().backward()
    with torch.inference_mode():
        attnkernels.attention(q, k, v)
    attention_with_kvcache(q[:, :, :1], k.detach(), v.detach(), cache_seqlens=5)
    # ... and any other call takes the op: here a dispatch mode.
    with pytest.raises(AssertionError, match="torch.library op"):
        with _Recorder():
            attnkernels.attention(q, k, v)


def test_fake_tensors_take_the_op():
    """Under FakeTensorMode the call goes through the op's fake (no kernel runs on fake data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 4, 11, 16) for _ in range(3))
        out = attnkernels.attention(q, k, v, causal=True)
        out_lin = linear_attention(q, k, v, causal=True)
    assert out.shape == (2, 4, 11, 16) and out_lin.shape == (2, 4, 11, 16)


def test_double_backward_is_refused_on_the_eager_path():
    """create_graph=True: the backward op has no autograd formula on either path; a second derivative
    errors rather than silently returning a wrong (zero) one."""
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, dtype=torch.float64)
    out = attnkernels.attention(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()
