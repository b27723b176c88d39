"""The decoder's C++ CPU kernels (`service/model/csrc/`) compute what the torch code they replace computes:
the decode attention writes the same cache entries and the same attention (to fp32 rounding; bf16 outputs
to one ulp) for strided new keys/values, grouped KV heads and sequences of different lengths, and refuses
inconsistent input; rotary is bit-identical; RMSNorm and silu * up agree to fp32 rounding (bf16: one ulp,
rarely). The decoder's step path uses them with the same logits as without them. Under CI the kernels
must build (a compiler is there); elsewhere their absence skips these tests."""
import os

import pytest
import torch

from service.engine.kv_cache import KVCache
from service.model import cpu_ops
from service.model.config import ModelConfig
from service.model.decoder import MLP, Decoder, RMSNorm, StepPlan, StepSequence, decode_attention
from service.model.rope import apply_rotary

if cpu_ops.kernel() is None:
    if os.environ.get("CI"):
        raise RuntimeError("the C++ decode attention did not build under CI (see the logged warning)")
    pytest.skip("the C++ decode attention is unavailable here (no compiler or ninja)", allow_module_level=True)


def _inputs(dtype, seed=0, dim=64):
    g = torch.Generator().manual_seed(seed)
    n, heads, kv_heads, slots, max_len = 20, 9, 3, 12, 80
    q = torch.randn(n, heads, dim, generator=g).to(dtype)
    packed = torch.randn(n, 2 * kv_heads * dim + 7, generator=g).to(dtype)    # k and v as strided views
    k = packed[:, :kv_heads * dim].view(n, kv_heads, dim)
    v = packed[:, kv_heads * dim:2 * kv_heads * dim].view(n, kv_heads, dim)
    k_cache = torch.randn(slots, kv_heads, max_len, dim, generator=g).to(dtype)
    v_cache = torch.randn(slots, kv_heads, max_len, dim, generator=g).to(dtype)
    tokens = torch.tensor([0, 3, 5, 6, 7, 11, 19])
    cache_slots = torch.tensor([4, 0, 11, 2, 7, 5, 9])
    positions = torch.tensor([0, 5, 79, 33, 1, 60, 10])
    return q, k, v, k_cache, v_cache, tokens, cache_slots, positions


@pytest.mark.parametrize("dim", [64, 128, 40])        # values in registers for 64 / 128, the plain loop else
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_torch_path(dtype, dim):
    q, k, v, k_cache, v_cache, tokens, slots, positions = _inputs(dtype, dim=dim)
    kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    out1, out2 = torch.zeros_like(q), torch.zeros_like(q)
    cpu_ops.decode_attention_(out1, q, k, v, kc1, vc1, tokens, slots, positions, dim ** -0.5)

    kc2[slots, :, positions] = k.index_select(0, tokens)
    vc2[slots, :, positions] = v.index_select(0, tokens)
    length = int(positions.max()) + 1
    visible = torch.arange(length)[None, :] <= positions[:, None]
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None, :]
    att = decode_attention(q.index_select(0, tokens), kc2[:, :, :length].index_select(0, slots),
                           vc2[:, :, :length].index_select(0, slots), mask)
    out2.index_copy_(0, tokens, att)

    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    untouched = torch.ones(q.shape[0], dtype=torch.bool)
    untouched[tokens] = False
    assert torch.equal(out1[untouched], torch.zeros_like(out1[untouched]))
    _assert_rounding_close(out1, out2, atol=2e-6)
    assert out1[tokens].abs().amax() > 0


def _assert_rounding_close(ours, torch_path, atol):
    """fp32: within `atol`; bf16: at most one ulp apart, and for under 1 % of the elements."""
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, torch_path, atol=atol, rtol=1e-6)
    else:
        ulp = torch_path.float().abs().clamp_min(2.0 ** -126) * 2.0 ** -7
        assert ((ours.float() - torch_path.float()).abs() <= ulp).all()
        assert (ours != torch_path).float().mean() < 0.01


def test_kernel_refuses_inconsistent_input():
    q, k, v, k_cache, v_cache, tokens, slots, positions = _inputs(torch.float32)
    out = torch.zeros_like(q)
    with pytest.raises(RuntimeError, match="share a cache slot"):
        cpu_ops.decode_attention_(out, q, k, v, k_cache, v_cache, tokens[:2], torch.tensor([1, 1]),
                                           positions[:2], 0.125)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.decode_attention_(out, q, k, v, k_cache, v_cache, tokens[:1], slots[:1],
                                           torch.tensor([80]), 0.125)
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_ops.decode_attention_(out, q, k, v, k_cache.bfloat16(), v_cache, tokens, slots, positions, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_step_uses_kernel_with_same_logits(monkeypatch, dtype):
    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    weights = {k: torch.randn(v.shape) * 0.3 for k, v in Decoder(config).state_dict().items()}
    model = Decoder.from_state_dict(config, weights, dtype=dtype)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))

    def run():
        cache = KVCache.for_model(config, 3, 32, dtype)
        plan = StepPlan([StepSequence(i, 0, 11) for i in range(3)], torch.tensor([10, 21, 32]))
        with torch.inference_mode():
            model.forward_step(ids[:, :11].flatten(), torch.arange(11).repeat(3), plan, cache)
            plan = StepPlan([StepSequence(2, 11, 1), StepSequence(0, 11, 1), StepSequence(1, 11, 1)],
                            torch.tensor([0, 1, 2]))
            return model.lm_head(model.forward_step(ids[[2, 0, 1], 11], torch.full((3,), 11), plan, cache))

    calls = []
    for name in ("decode_attention_", "rms_norm", "rotary", "silu_mul"):
        native = getattr(cpu_ops, name)
        monkeypatch.setattr(cpu_ops, name, lambda *a, name=name, native=native: calls.append(name) or native(*a))
    with_kernel = run()
    layers = config.num_hidden_layers
    assert sorted(set(calls)) == ["decode_attention_", "rms_norm", "rotary", "silu_mul"]
    assert calls.count("decode_attention_") == layers and calls.count("rms_norm") == 2 * (2 * layers + 1)
    monkeypatch.setattr(cpu_ops, "kernel", lambda: None)
    without = run()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(with_kernel, without, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bit_identical(dtype):
    g = torch.Generator().manual_seed(3)
    n, heads, kv_heads, dim = 7, 6, 2, 16
    packed = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)     # q/k as strided views
    q = packed[:, :heads * dim].view(n, heads, dim)
    k = packed[:, heads * dim:(heads + kv_heads) * dim].view(n, kv_heads, dim)
    angles = torch.rand(n, 1, dim, generator=g) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q1, k1 = cpu_ops.rotary(q, k, cos, sin)
    q2, k2 = apply_rotary(q, k, (cos, sin))
    assert torch.equal(q1, q2) and torch.equal(k1, k2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_silu_mul_equal_torch(dtype):
    g = torch.Generator().manual_seed(4)
    norm = RMSNorm(96, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    x = (torch.randn(5, 3, 96, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        ours = cpu_ops.rms_norm(x, norm.weight, norm.eps)
        xf = x.float()
        expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    assert ours.shape == x.shape
    _assert_rounding_close(ours, expected, atol=1e-5)

    gate = (torch.randn(9, 40, generator=g) * 4).to(dtype)
    up = torch.randn(9, 40, generator=g).to(dtype)
    _assert_rounding_close(cpu_ops.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 200])            # inline, and past 64 Ki values: on the kernels' pool
def test_add_rms_norm_is_the_add_then_the_norm(dtype, rows):
    """add_rms_norm_ (the decode loop's residual add fused with the next norm): x becomes x + residual with the
    bits of torch's add, and the result has the bits of rms_norm of that x; from the engine's kind of thread too."""
    import threading

    g = torch.Generator().manual_seed(5)
    weight = torch.randn(576, generator=g).to(dtype)
    x = (torch.randn(rows, 576, generator=g) * 3).to(dtype)
    residual = torch.randn(rows, 576, generator=g).to(dtype)
    added = x + residual
    expected = cpu_ops.rms_norm(added, weight, 1e-5)
    for thread in (False, True):
        mine = x.clone()
        got = []
        call = lambda: got.append(cpu_ops.kernel().add_rms_norm_(mine, residual, weight, 1e-5))   # noqa: E731
        if thread:
            worker = threading.Thread(target=call)
            worker.start()
            worker.join(60)
        else:
            call()
        assert torch.equal(mine, added) and torch.equal(got[0], expected)
    if rows > 1:                                       # a transposed x is refused, not read wrongly
        with pytest.raises(RuntimeError, match="contiguous"):
            cpu_ops.kernel().add_rms_norm_(x.t().contiguous().t(), residual, weight, 1e-5)


def test_silu_mul_is_accurate_over_the_whole_range():
    """silu within 8 fp32 ulps (relative) of the fp64 value where e^-x is finite in fp32 (|x| <= 88), beyond
    it x itself or a negligible |s| < 1e-36 (torch's silu gives -0 there), NaN stays NaN (a failing request's
    rows must stay non-finite), and a row's values do not depend on how many rows share the call."""
    x = torch.linspace(-120, 120, 200_000)
    gate = torch.cat([x, torch.tensor([float("nan"), 0.0, -0.0])]).view(1, -1)
    up = torch.ones_like(gate)
    ours = cpu_ops.silu_mul(gate, up)
    exact = gate.double() * torch.sigmoid(gate.double())
    inner = (gate.abs() <= 88) & (gate != 0)
    rel = ((ours.double() - exact).abs() / exact.abs())[inner]
    assert rel.max() <= 8 * torch.finfo(torch.float32).eps
    assert torch.equal(ours[gate > 88], gate[gate > 88])
    assert (ours[gate < -88].abs() < 1e-36).all()
    assert ours[0, -3].isnan() and ours[0, -2:].tolist() == [0.0, 0.0]
    rows = gate[:, :4096].repeat(16, 1) * torch.linspace(0.5, 1.5, 16)[:, None]        # [16, 4096]
    together = cpu_ops.silu_mul(rows, torch.ones_like(rows))
    alone = torch.cat([cpu_ops.silu_mul(rows[i:i + 1], torch.ones_like(rows[i:i + 1])) for i in range(16)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_rows_and_argmax_equal_torch(dtype):
    """The engine's greedy pick and its non-finite check: each row's first maximal index (ties included)
    and whether the row is all finite, as torch.isfinite(...).all(-1) and argmax(-1) give them."""
    torch.manual_seed(0)
    logits = torch.randn(9, 4099).to(dtype)
    logits[1, 7] = float("nan")
    logits[2, 11] = float("inf")
    logits[3, 5] = logits[3, 900] = 50.0                        # a tie: the first index wins
    logits[4, -1] = float("-inf")
    finite, argmax = cpu_ops.finite_rows_and_argmax(logits)
    assert finite == torch.isfinite(logits).all(dim=-1).tolist() == [True, False, False, True, False] + [True] * 4
    ref = logits.float().argmax(dim=-1).tolist()
    assert [a for a, ok in zip(argmax, finite) if ok] == [r for r, ok in zip(ref, finite) if ok]
    assert argmax[3] == 5
    strided = torch.randn(4, 64).to(dtype)[:, ::2]              # not contiguous rows: torch's ops answer
    assert cpu_ops.finite_rows_and_argmax(strided) == ([True] * 4, strided.float().argmax(dim=-1).tolist())


def test_fp32_argmax_where_the_maximum_and_the_bad_values_lie():
    """The fp32 rows' vector passes (max and finiteness, then the first index of the max): the maximum in the
    first, a middle and the tail chunk, ties across chunks, -0 against 0, NaN or inf only in the tail or
    the last whole chunk, rows of -inf only, and lengths around the vector widths."""
    torch.manual_seed(1)
    for vocab in (1, 7, 8, 15, 16, 17, 49152, 49155):
        logits = torch.randn(10, vocab) - 10
        places = [0, vocab // 2, vocab - 1]
        for row, at in enumerate(places):
            logits[row, at] = 5.0
        logits[3, vocab // 3], logits[3, vocab - 1] = 7.0, 7.0                 # a tie, across chunks when long
        logits[4] = -1.0
        logits[4, vocab - 1] = 0.0
        logits[4, vocab // 2] = -0.0                                        # -0 == 0: the first of them
        logits[5, vocab - 1] = float("nan")
        logits[6, vocab - 1] = float("inf")
        logits[7, max(0, vocab - 17)] = float("-inf")
        logits[8] = float("-inf")
        logits[9, max(0, vocab - 16)] = float("nan")
        finite, argmax = cpu_ops.finite_rows_and_argmax(logits)
        assert finite == torch.isfinite(logits).all(dim=-1).tolist(), vocab
        ref = logits.argmax(dim=-1).tolist()
        assert [a for a, ok in zip(argmax, finite) if ok] == [r for r, ok in zip(ref, finite) if ok], vocab
        assert argmax[:3] == places[:3] and argmax[3] == min(vocab // 3, vocab - 1)
