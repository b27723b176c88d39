"""The Triton SGMV kernels (`adapters_core/triton_sgmv.py`) compute what the torch path computes.

Run on the CPU by Triton's interpreter (`TRITON_INTERPRET=1`, which tests/conftest.py sets without a GPU):
directly against `((x @ A[slot]) * scale) @ B[slot]` per token for fp32 and bf16, mixed ranks in one padded
stack, base tokens, per-token scales, strided output rows and padded segments; and through `token_batch` /
`mixed_batch` on a model with LoRA adapters of several ranks, alphas and rsLoRA, against the same batch on
the torch path (`stack._lora_delta`), with the kernels counted so that a silent fallback fails. The last
test compiles both kernels for an H200 (sm_90) with Triton's own compiler and ptxas, which needs no GPU.
Triton is in the `test` extra: under CI its absence fails; elsewhere it skips these tests."""
import os
import subprocess
import sys

import pytest
import torch

import adapters_core as ac
from adapters_core import cuda_lora, sgmv

try:
    from adapters_core import triton_sgmv
except ImportError:
    if os.environ.get("CI"):
        raise RuntimeError("triton is missing under CI (it is in the test extra)")
    pytest.skip("triton is not installed (pip install triton: the test extra has it)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":     # tests/conftest.py sets it where there is no GPU
    pytest.skip("Triton's interpreter is off (a GPU is present: tests/gpu checks the kernels on it)",
                allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reference(out, x, a, b, slots, scales):
    """The torch path's arithmetic per token: fp32 shrink, scaled, rounded to B's dtype, fp32 expand."""
    h = torch.einsum("ti,tir->tr", x.to(a.dtype).float(), a[slots].float())
    if scales is not None:
        h = h * scales[:, None]
    h = h.to(b.dtype).float()
    return (out.float() + torch.einsum("tr,tro->to", h, b[slots].float())).to(out.dtype)


def stacks(dtype, ranks=(0, 4, 16, 7, 3), fin=40, fout=70, seed=0):
    """A [n, fin, R] / B [n, R, fout] padded to the largest rank, slot 0 (the base) zeros, as LayerStack keeps."""
    g = torch.Generator().manual_seed(seed)
    n, r_max = len(ranks), max(ranks)
    a, b = torch.zeros(n, fin, r_max), torch.zeros(n, r_max, fout)
    for slot, r in enumerate(ranks):
        a[slot, :, :r] = torch.randn(fin, r, generator=g) * 0.3
        b[slot, :r, :] = torch.randn(r, fout, generator=g) * 0.3
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("fin", [40, 700])
def test_per_token_segments_equal_reference(dtype, scaled, fin):
    """Decode-shaped: one token per segment (no gather), every slot including the base, into strided rows;
    700 input features are summed in 3 partial sums (the last one short), 40 in one."""
    assert triton_sgmv._split_k(9, fin) == ((1, 64) if fin == 40 else (3, 256))
    g = torch.Generator().manual_seed(1)
    a, b = stacks(dtype, fin=fin)
    slots = torch.tensor([1, 0, 2, 3, 4, 2, 0, 1, 3])
    x = torch.randn(len(slots), a.shape[1], generator=g).to(dtype)
    wide = torch.randn(len(slots), b.shape[2] + 9, generator=g).to(dtype)
    out = wide[:, 4:4 + b.shape[2]]                       # output rows inside a wider tensor (a joined matmul)
    scales = torch.rand(len(slots), generator=g) * 2 if scaled else None
    expected = reference(out, x, a, b, slots, scales)
    before = wide.clone()
    triton_sgmv.add_lora_(out, x, a, b, slots, None, 1, scales, block_n=64 if fin == 40 else 128)
    # bf16: h is rounded to bf16 before the expand, here and in the reference; summed in another order (partial
    # sums), a value next to a rounding boundary may round the other way: one bf16 step of h, times B
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(out, expected, atol=tol, rtol=2e-2)
    assert torch.equal(out[slots == 0], before[:, 4:4 + b.shape[2]][slots == 0])      # base rows untouched
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + b.shape[2]:], before[:, 4 + b.shape[2]:])
    assert not torch.equal(out, before[:, 4:4 + b.shape[2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_segments_with_padding_add_once(dtype):
    """Prefill-shaped: segments of up to L tokens from `gather`, short ones padded by repeating their last
    token, and a segment longer than one tile (BLOCK_M): every token gets its delta exactly once."""
    g = torch.Generator().manual_seed(2)
    a, b = stacks(dtype)
    runs = [(1, 40), (0, 3), (3, 5), (2, 1), (4, 17)]            # (slot, tokens) in token order
    slots = torch.cat([torch.full((n,), s) for s, n in runs])
    seg_len = 20
    seg_slots, rows, start = [], [], 0
    for s, n in runs:
        for p in range(0, n, seg_len):
            idx = list(range(start + p, start + min(n, p + seg_len)))
            rows.append(idx + [idx[-1]] * (seg_len - len(idx)))
            seg_slots.append(s)
        start += n
    x = torch.randn(len(slots), a.shape[1], generator=g).to(dtype)
    out = torch.randn(len(slots), b.shape[2], generator=g).to(dtype)
    scales = torch.rand(len(slots), generator=g) + 0.5
    expected = reference(out, x, a, b, slots, scales)
    triton_sgmv.add_lora_(out, x, a, b, torch.tensor(seg_slots), torch.tensor(rows), seg_len, scales)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(32, 48))
    model.add_module("act", torch.nn.Tanh())
    model.add_module("down_proj", torch.nn.Linear(48, 16))
    for i, (r, alpha, rs) in enumerate(((4, 8, False), (16, 4, True), (2, 32, False))):
        ac.inject_adapter_in_model(ac.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, init_lora_weights=False,
                                                 target_modules=["q_proj", "down_proj"]), model, f"l{i}")
    return model.eval()


@pytest.fixture
def triton_forced(monkeypatch):
    """The stacked path with the Triton kernels on CPU tensors (interpreter) and the fused CPU kernel off;
    returns the list of kernel calls made."""
    calls = []
    real = triton_sgmv.add_lora_
    monkeypatch.setattr(sgmv, "kernel", lambda arch="native": None)
    monkeypatch.setattr(cuda_lora._KERNELS, "mode", "1")
    monkeypatch.setattr(triton_sgmv, "add_lora_", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _torch_path(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(cuda_lora._KERNELS, "mode", "0")
        return fn()


def test_token_batch_equals_torch_path(monkeypatch, triton_forced):
    """A flattened batch as the engine builds it: runs of prompt tokens and single decode tokens on
    different adapters and the base, with per-token scales, through the model's real stacked path."""
    model = _model()
    names = ["l0"] * 9 + ["__base__", "l1", "l2", "l2", "l1"] + ["l2"] * 6 + ["__base__"] * 2 + ["l0"]
    scales = [1.0] * 9 + [1.0, 0.5, 2.0, 2.0, 0.5] + [1.0] * 6 + [1.0, 1.0, 3.0]
    x = torch.randn(len(names), 32, generator=torch.Generator().manual_seed(3))

    def run():
        with torch.inference_mode(), ac.token_batch(model, names, scales=scales):
            return model(x)

    expected = _torch_path(monkeypatch, run)
    got = run()
    assert len(triton_forced) == 2                       # q_proj and down_proj took the kernels
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        assert not torch.allclose(got, model(x), atol=1e-3)      # the adapters changed the output


def test_mixed_batch_rows_equal_torch_path(monkeypatch, triton_forced):
    """Rows layout ([B, S, features], one adapter per row) with a bf16 model and fp32 adapters."""
    model = _model().to(torch.bfloat16)
    ac.cast_adapter_dtype(model, "l1")                  # fp32 stacks beside bf16 activations
    names = ["l1", "__base__", "l0", "l2"]
    x = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)

    def run():
        with torch.inference_mode(), ac.mixed_batch(model, names):
            return model(x)

    expected = _torch_path(monkeypatch, run)
    got = run()
    assert len(triton_forced) == 2
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factors_beside_fp32_activations(monkeypatch, triton_forced, factor_dtype):
    """An fp32 model whose adapters a server holds in bf16 / fp16 (`adapter_dtype`): the kernels read the padded
    half-precision stacks beside fp32 activations and outputs, as the torch path does."""
    from adapters_core.management import cast_adapter_factors

    model = _model()
    for name in ("l0", "l1", "l2"):
        cast_adapter_factors(model, name, factor_dtype)
    names = ["l1", "__base__", "l0", "l2"]
    x = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(5))

    def run(rows=names):
        with torch.inference_mode(), ac.mixed_batch(model, rows):
            return model(x)

    expected = _torch_path(monkeypatch, run)
    got = run()
    assert len(triton_forced) == 2 and got.dtype == torch.float32
    assert model.q_proj.stack.padded()[0].dtype == factor_dtype
    # both paths round x and h to the factors' dtype, at different points: a few roundings of the delta
    delta = (expected - _torch_path(monkeypatch, lambda: run(["__base__"] * 4))).abs().max()
    assert (got - expected).abs().max() <= 4 * torch.finfo(factor_dtype).eps * delta


_COMPILE = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adapters_core import triton_sgmv as ts
for dt in ("*bf16", "*fp32"):
    common = {"seg_slots_ptr": "*i64", "gather_ptr": "*i64", "seg_len": "i32", "rank": "i32"}
    shrink = dict(common, x_ptr=dt, a_ptr=dt, h_ptr="*fp32", scales_ptr="*fp32", in_features="i32",
                  split_len="i32", split_stride="i32", stride_xt="i32", stride_an="i32", stride_ak="i32")
    expand = dict(common, h_ptr="*fp32", b_ptr=dt, out_ptr=dt, out_features="i32", splits="i32",
                  split_stride="i32", stride_bn="i32", stride_br="i32", stride_ot="i32")
    flags = dict(HAS_GATHER=True, DOT_FP32=dt == "*fp32", BLOCK_M=16, BLOCK_R=16)
    for fn, sig, extra in ((ts._shrink_kernel, shrink, dict(HAS_SCALES=True, BLOCK_K=64)),
                           (ts._expand_kernel, expand, dict(BLOCK_N=64))):
        consts = dict(flags, **extra)
        sig = dict(sig, **{k: "constexpr" for k in consts})
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], fn
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Both kernels compile to an sm_90 cubin (what an H200 runs), in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
