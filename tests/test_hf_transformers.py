"""attn_implementation="attnkernels" in HF transformers: tiny random-init models, logits against SDPA/eager.

Models are built from configs in code (no downloads). Left-padded rows are
compared against SDPA only at real tokens: eager's fully masked padded rows put
NaN into later layers in float64, and padded positions' outputs are undefined.
"""
import pytest
import torch

import attnkernels

from .backend_params import BACKENDS, backend_feature_param, backend_modifier_param, backend_param

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers==5.23.0)")

from attnkernels.integrations import transformers as hf_backend  # noqa: E402

NAME = hf_backend.register()

VOCAB = 128


def _config(kind: str, **extra):
    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64, **extra)
    if kind == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if kind == "mistral":  # every layer windowed: W = 5 keys including the query itself
        return transformers.MistralConfig(sliding_window=5, **common), transformers.MistralForCausalLM
    if kind == "qwen2":  # MQA (one kv head), biased q/k/v projections
        common["num_key_value_heads"] = 1
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    raise ValueError(kind)


def _model(kind: str, dtype):
    torch.manual_seed(0)
    config, cls = _config(kind)
    return cls(config).to(dtype).eval()


class _Spy:
    """Counts calls of the registered function, so a test cannot pass on another implementation."""

    def __init__(self, monkeypatch):
        self.calls = 0
        inner = transformers.AttentionInterface._global_mapping[NAME]

        def spy(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setitem(transformers.AttentionInterface._global_mapping, NAME, spy)


def _inputs(batch=2, length=13, left_pad=()):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(left_pad):
        mask[b, :p] = 0
    return ids, mask


def _logits(model, impl, ids, mask, backend="reference"):
    model.set_attn_implementation(impl)
    with attnkernels.backend(backend):
        return model(input_ids=ids, attention_mask=mask).logits


def _hidden_states(model, impls, ids, mask) -> dict:
    """impl -> last hidden state of an encoder on (ids, mask), our backend on the reference kernels."""
    out = {}
    for impl in impls:
        model.set_attn_implementation(impl)
        with attnkernels.backend("reference"):
            out[impl] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return out


# The Triton interpreter run is kept to float32 (and these tiny shapes).
DTYPE_BACKENDS = [(torch.float64, b) for b in BACKENDS if b != "triton"] + [(torch.float32, b) for b in BACKENDS]


@pytest.mark.parametrize("dtype,backend", DTYPE_BACKENDS,
                         ids=[f"{'f64' if d == torch.float64 else 'f32'}-{b}" for d, b in DTYPE_BACKENDS])
@pytest.mark.parametrize("pad", [(0, 0), (4, 0)], ids=["nopad", "leftpad4"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_logits_match_sdpa_B2_N13(kind, pad, dtype, backend, monkeypatch):
    backend_feature_param(backend, *(["key_padding_mask"] if any(pad) else []))
    model = _model(kind, dtype)
    ids, mask = _inputs(left_pad=pad)
    expected = _logits(model, "sdpa", ids, mask)
    spy = _Spy(monkeypatch)
    got = _logits(model, NAME, ids, mask, backend)
    assert spy.calls == model.config.num_hidden_layers
    real = mask.bool()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[real], expected[real], **tol)
    if not any(pad):  # and against eager (no NaN problem without padding; its softmax runs in float32)
        torch.testing.assert_close(got, _logits(model, "eager", ids, mask), rtol=1e-4, atol=1e-5)


def test_padding_is_not_ignored_B2_N13():
    """The mask reaches the kernel: the real tokens' logits change when the pads are unmasked."""
    model = _model("llama", torch.float64)
    ids, mask = _inputs(left_pad=(5, 0))
    padded = _logits(model, NAME, ids, mask)
    unmasked = _logits(model, NAME, ids, torch.ones_like(mask))
    assert not torch.allclose(unmasked[0, 5:], padded[0, 5:]), "padding must change the real tokens' logits"
    torch.testing.assert_close(unmasked[1], padded[1], rtol=1e-12, atol=1e-12)  # the unpadded row is unchanged


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_gradients_match_sdpa_B2_N11_leftpad3(kind):
    model = _model(kind, torch.float64)
    ids, mask = _inputs(length=11, left_pad=(3, 0))
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for impl in ("sdpa", NAME):
        model.zero_grad()
        model.set_attn_implementation(impl)
        with attnkernels.backend("reference"):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[NAME].keys() == grads["sdpa"].keys() and len(grads[NAME]) > 0
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads[NAME][name], g, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind,cache", [("llama", "dynamic"), ("mistral", "dynamic"), ("qwen2", "dynamic"),
                                        ("llama", "static"), ("mistral", "static")])
def test_generate_with_kv_cache_matches_sdpa_B2_N9_new6(kind, cache):
    """Greedy decoding: prefill, then Nq=1 steps against the cache (bottom-right causal, padded keys).

    A static cache hands all max_cache_len slots to attention; the unfilled ones must be cut off.
    """
    model = _model(kind, torch.float64)
    ids, mask = _inputs(length=9, left_pad=(3, 0))
    out = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        with attnkernels.backend("reference"):
            out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       pad_token_id=0, use_cache=True, cache_implementation=cache)
    assert torch.equal(out[NAME], out["sdpa"])
    assert out[NAME].shape == (2, 15)


def test_static_cache_trailing_slots_are_cut_B1_N6():
    """A static cache hands keys for all max_cache_len slots; the unfilled ones are never seen."""
    q = torch.randn(1, 4, 3, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 10, 16, dtype=torch.float64)
    # queries at positions 3, 4, 5 of a 10-slot cache (top-left causal over the slots); slot 0 is padding
    pos_q, pos_k = torch.arange(3, 6)[:, None], torch.arange(10)[None, :]
    visible = ((pos_k <= pos_q) & (pos_k >= 1))[None, None]
    key, value, padding = hf_backend.padding_from_hf_mask(visible, q, k, k, (-1, 0))
    assert key.shape[2] == 6 and value.shape[2] == 6
    assert padding.tolist() == [[True, False, False, False, False, False]]


def test_encoder_bidirectional_with_padding_B2_N10():
    """A BERT encoder (is_causal=False) with right padding: the padding mask alone."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                                     vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config).double().eval()
    ids, _ = _inputs(length=10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = _hidden_states(model, ("sdpa", NAME), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out[NAME][real], out["sdpa"][real], rtol=1e-10, atol=1e-10)


def test_document_mask_matches_sdpa_B1_N8():
    """A 4-D mask that is not band + padding (two packed documents) runs as an additive bias. (SDPA is the
    reference: eager adds a bool 4-D mask to the logits as 0/1, and its softmax runs in float32.)"""
    model = _model("llama", torch.float64)
    ids, _ = _inputs(batch=1, length=8)
    doc = torch.zeros(8, 8, dtype=torch.bool)
    doc[:4, :4] = doc[4:, 4:] = True  # two packed documents
    mask = (doc & torch.ones(8, 8, dtype=torch.bool).tril())[None, None]
    got, expected = (_logits(model, impl, ids, mask) for impl in (NAME, "sdpa"))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_additive_bias_mask_is_not_a_band():
    q = torch.randn(1, 2, 4, 16)
    bias = torch.randn(1, 1, 4, 4)
    with pytest.raises(hf_backend.NotABandMask, match="additive bias"):
        hf_backend.padding_from_hf_mask(bias, q, q, q, (-1, 0))


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_static_cache_unpadded_generate_matches_eager_B2_N7_new5(kind):
    """Regression: an unpadded batch into a static cache arrives with no mask and all max_cache_len slots;
    the unfilled slots must not be attended (they were: prefill logits off by up to 0.17, other tokens)."""
    torch.manual_seed(0)
    if kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                            num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
        model = transformers.GPTNeoXForCausalLM(config).double().eval()
    else:
        model = _model(kind, torch.float64)
    ids, mask = _inputs(length=7)
    out, calls = {}, {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with attnkernels.backend("reference"):
            gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True,
                                 cache_implementation="static", output_scores=True, return_dict_in_generate=True)
        out[impl] = gen
    assert torch.equal(out[NAME].sequences, out["eager"].sequences)
    for ours, eager in zip(out[NAME].scores, out["eager"].scores):
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)  # generate hands back float32 scores


def test_modernbert_bidirectional_window_N140_matches_eager():
    """ModernBERT's local layers pass a two-sided sliding_window=W meaning |i - j| < W; on inputs longer
    than the window the backend once mapped it to (W, W) and the mask check raised."""
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                           num_hidden_layers=3, vocab_size=VOCAB, max_position_embeddings=256,
                                           local_attention=16, global_attn_every_n_layers=3,
                                           attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = transformers.ModernBertModel(config).double().eval()
    ids, _ = _inputs(batch=2, length=140)
    mask = torch.ones(2, 140, dtype=torch.long)
    mask[1, 135:] = 0  # 5 padded keys: every row still sees a real key (eager NaNs on fully masked rows)
    out = _hidden_states(model, ("eager", NAME), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out[NAME][real], out["eager"][real], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_batch_matches_each_sequence_alone_llama_N5_3_4(how):
    """A packed batch (DataCollatorWithFlattening: position_ids restarting at 0, or cu_seq_lens_q/k
    kwargs) goes to the varlen path: each sequence's logits equal the sequence run alone."""
    model = _model("llama", torch.float64)
    model.set_attn_implementation(NAME)
    lengths = [5, 3, 4]
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lengths]
    ids = torch.cat(seqs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    extra = {}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    with attnkernels.backend("reference"):
        packed = model(input_ids=ids, position_ids=position_ids, **extra).logits[0]
        alone = [model(input_ids=s).logits[0] for s in seqs]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-10, atol=1e-10)


# --- models that need the score modifiers: softcap, sinks, relative position bias, dropout ---------

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)


def _modifier_model(kind: str, dtype=torch.float64):
    """(model in `dtype`, eval, the modifiers its attention uses)."""
    model, modifiers = _modifier_model_f64(kind)
    return model.to(dtype), modifiers


def _modifier_model_f64(kind: str):
    torch.manual_seed(0)
    if kind == "gemma2":  # logit softcap on every layer, sliding window on every other one
        config = transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=4, attn_logit_softcapping=5.0,
                                           query_pre_attn_scalar=16)
        return transformers.Gemma2ForCausalLM(config).double().eval(), ("softcap",)
    if kind == "gpt_oss":  # learned attention sinks, sliding + full layers, MoE MLP
        config = transformers.GptOssConfig(**SMALL, head_dim=16, sliding_window=4, num_local_experts=4,
                                           num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
        model = transformers.GptOssForCausalLM(config).double().eval()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()  # init leaves them 0; give each head its own sink
        return model, ()
    if kind == "t5":  # learned relative position bias (+ the padding mask) in encoder, decoder, cross attention
        config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(config).double().eval(), ("attn_bias",)
    raise ValueError(kind)


def _forward(model, impl, ids, mask, backend):
    model.set_attn_implementation(impl)
    with attnkernels.backend(backend):
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7]).logits
        return model(input_ids=ids, attention_mask=mask).logits


# Left-padded float64 eager runs put NaN into every row of a padded sequence (fully masked rows in
# float64), so padding is compared in float32.
# gpt-oss's MoE (grouped_mm) takes no float64.
MODEL_CASES = [(kind, pad, dtype) for kind in ("gemma2", "gpt_oss", "t5")
               for pad, dtype in (((0, 0), torch.float64), ((0, 0), torch.float32), ((3, 0), torch.float32))
               if not (kind == "gpt_oss" and dtype == torch.float64)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind, pad, dtype", MODEL_CASES,
                         ids=[f"{k}-{'leftpad3' if any(p) else 'nopad'}-{str(d)[-7:]}" for k, p, d in MODEL_CASES])
def test_modifier_models_match_eager_B2_N11(kind, pad, dtype, backend, monkeypatch):
    model, modifiers = _modifier_model(kind, dtype)
    backend_modifier_param(backend, *modifiers)
    ids, mask = _inputs(length=11, left_pad=pad)
    expected = _forward(model, "eager", ids, mask, backend)
    spy = _Spy(monkeypatch)
    got = _forward(model, NAME, ids, mask, backend)
    assert spy.calls >= model.config.num_hidden_layers
    real = mask.bool() if not model.config.is_encoder_decoder else torch.ones(2, 7, dtype=torch.bool)
    # Gemma2's and gpt-oss's eager softmax runs in float32 even for float64 models: ~1e-7 is eager's own error
    tol = 1e-9 if kind == "t5" and dtype == torch.float64 else 1e-6 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got[real], expected[real], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_t5_relative_bias_gradient_matches_eager_B2_N9(backend):
    """position_bias requires grad (an Embedding's output): its gradient flows back through dbias."""
    model, modifiers = _modifier_model("t5")
    backend_modifier_param(backend, *modifiers)
    ids, mask = _inputs(length=9, left_pad=(2, 0))
    grads = {}
    for impl in ("eager", NAME):
        model.zero_grad()
        logits = _forward(model, impl, ids, mask, backend)
        with attnkernels.backend(backend):  # the backward runs the backend chosen when it runs
            logits.sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if "relative_attention_bias" in n}
    assert grads[NAME]
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads[NAME][name], grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gemma2_and_gpt_oss_generate_like_eager_static_and_dynamic(backend):
    for kind in ("gemma2", "gpt_oss"):
        model, modifiers = _modifier_model(kind, torch.float32)  # float32: float64 eager NaNs on padding
        backend_modifier_param(backend, *modifiers)
        ids, mask = _inputs(length=6, left_pad=(2, 0))
        for cache in ("dynamic", "static"):
            tokens = {}
            for impl in ("eager", NAME):
                model.set_attn_implementation(impl)
                with attnkernels.backend(backend):
                    tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                                  pad_token_id=0, cache_implementation=cache)
            assert torch.equal(tokens[NAME], tokens["eager"]), (kind, cache)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_training_step_with_attention_dropout_B2_N10(backend):
    """config.attention_dropout > 0 in train mode: dropout runs (the loss differs from p = 0), the step is
    reproducible from torch's seed, and every gradient is finite."""
    backend_modifier_param(backend, "dropout")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, attention_dropout=0.3)
    model = transformers.LlamaForCausalLM(config).train()
    model.set_attn_implementation(NAME)
    ids, mask = _inputs(length=10, left_pad=(2, 0))

    def loss(seed):
        torch.manual_seed(seed)
        with attnkernels.backend(backend):
            return model(input_ids=ids, attention_mask=mask, labels=ids).loss

    first, again, other = loss(1), loss(1), loss(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    model.eval()
    with attnkernels.backend(backend):
        plain = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert not torch.equal(first, plain)
    model.train()
    model.zero_grad()
    with attnkernels.backend(backend):
        loss(1).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- a sweep over the model families users run (tiny random configs, no downloads) ---------------

_DECODER = dict(SMALL, max_position_embeddings=256)
_ENCODER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                max_position_embeddings=256)
SWEEP = {
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_DECODER, head_dim=16)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**_DECODER, head_dim=16)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **_DECODER, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**_DECODER, pad_token_id=0)),
    "olmo2": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**_DECODER)),
    "starcoder2": lambda: transformers.Starcoder2ForCausalLM(transformers.Starcoder2Config(**_DECODER, sliding_window=4)),
    "smollm3": lambda: transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**_DECODER, pad_token_id=0)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                                         n_positions=256)),
    "bert": lambda: transformers.BertModel(transformers.BertConfig(**_ENCODER)),
    "roberta": lambda: transformers.RobertaModel(transformers.RobertaConfig(**_ENCODER, pad_token_id=1)),
    "whisper": lambda: transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, decoder_start_token_id=1)),
}
GENERATORS = ("qwen3", "gemma3", "phi3", "olmo2", "starcoder2", "smollm3", "gpt2")


def _sweep_outputs(model, impl, ids, mask, backend):
    model.set_attn_implementation(impl)
    with attnkernels.backend(backend):
        if isinstance(model, transformers.WhisperForConditionalGeneration):
            features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2), dtype=model.dtype)
            return model(input_features=features, decoder_input_ids=ids).logits
        out = model(input_ids=ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("pad, dtype", [((0, 0), torch.float64), ((3, 0), torch.float32)],
                         ids=["nopad-f64", "leftpad3-f32"])
@pytest.mark.parametrize("kind", list(SWEEP))
def test_model_sweep_matches_eager_B2_N11(kind, pad, dtype, backend):
    backend_param(backend)
    torch.manual_seed(0)
    model = SWEEP[kind]().to(dtype).eval()
    ids, mask = _inputs(length=11, left_pad=() if kind == "whisper" else pad)
    got, expected = (_sweep_outputs(model, impl, ids, mask, backend) for impl in (NAME, "eager"))
    real = mask.bool()
    # several eager softmaxes run in float32 even in float64 models
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got[real], expected[real], rtol=tol, atol=tol)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", GENERATORS)
def test_model_sweep_generates_like_eager_B2_N6_leftpad2(kind, cache):
    backend_param("cpu")
    torch.manual_seed(0)
    model = SWEEP[kind]().float().eval()
    ids, mask = _inputs(length=6, left_pad=(2, 0))
    tokens = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with attnkernels.backend("cpu"):
            tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                          cache_implementation=cache)
    assert torch.equal(tokens[NAME], tokens["eager"])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_runs_the_cpu_decode_kernel_on_cache_views_llama(cache, monkeypatch):
    """Each greedy step after the prefill (Nq = 1) reaches the split-KV decode kernel with the cache's
    keys as they are (a prefix view of a static cache, no copy), and the tokens equal eager's."""
    backend_param("cpu")
    from attnkernels.softmax import cpu_launch

    if not hasattr(attnkernels.backends.cpu_kernels(), "attention_decode_fwd"):
        pytest.skip("this C++ build has no decode kernel")
    steps = []
    inner = cpu_launch.uses_decode

    def spy(call, q, k, v):
        taken = inner(call, q, k, v)
        if q.shape[2] == 1:
            steps.append((taken, k.is_contiguous() or k.stride(-1) == 1))
        return taken

    monkeypatch.setattr(cpu_launch, "uses_decode", spy)
    model = _model("llama", torch.float32)
    ids, mask = _inputs(length=6, left_pad=(2, 0))
    tokens = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with attnkernels.backend("cpu"):
            tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                          cache_implementation=cache)
    assert torch.equal(tokens[NAME], tokens["eager"])
    assert len(steps) == 3 * model.config.num_hidden_layers and all(taken and rows for taken, rows in steps)
