"""The Triton decode attention (`service/model/triton_attention.py`) equals the torch path.

Run on the CPU by Triton's interpreter (`TRITON_INTERPRET=1`, which tests/conftest.py sets without a GPU):
directly against `decoder.decode_attention` over gathered cache rows for fp32 and bf16 caches, grouped-query head
layouts (SmolLM2's 9/3, Llama-3.2-1B's 32/8, 4/2, no grouping), a head size that is no power of two, lengths
from 1 to past one block; and inside `Decoder.forward_step` (decode tokens beside a prompt chunk) against the
torch path with the kernel counted. The last test compiles it for an H200 (sm_90) without a GPU.
Triton is in the `test` extra: under CI its absence fails; elsewhere it skips these tests."""
import os
import subprocess
import sys

import pytest
import torch
import transformers

from service.engine.kv_cache import KVCache
from service.model import cpu_ops, cuda_ops
from service.model.config import ModelConfig
from service.model.decoder import Decoder, StepPlan, StepSequence, decode_attention

try:
    from service.model import triton_attention
except ImportError:
    if os.environ.get("CI"):
        raise RuntimeError("triton is missing under CI (it is in the test extra)")
    pytest.skip("triton is not installed (pip install triton: the test extra has it)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":     # tests/conftest.py sets it where there is no GPU
    pytest.skip("Triton's interpreter is off (a GPU is present: tests/gpu checks the kernel on it)",
                allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def torch_reference(q, k_cache, v_cache, tokens, slots, last):
    max_len = int(last.max()) + 1
    keys = k_cache[:, :, :max_len].index_select(0, slots)
    values = v_cache[:, :, :max_len].index_select(0, slots)
    visible = torch.arange(max_len)[None, :] <= last[:, None]
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None, :]
    return decode_attention(q.index_select(0, tokens), keys, values, mask)


@pytest.mark.parametrize("dtype,precise", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 64), (4, 2, 16), (4, 4, 40)])
def test_kernel_equals_torch_decode_attention(dtype, precise, heads, kv_heads, head_dim):
    """The kernel against the torch path; `precise=False` (bf16 products on the tensor cores, probabilities
    rounded to bf16: a tuning variant, not the default) within bf16's rounding of the probabilities."""
    g = torch.Generator().manual_seed(heads + head_dim)
    slots_n, max_seq = 6, 150
    k_cache = torch.randn(slots_n, kv_heads, max_seq, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(slots_n, kv_heads, max_seq, head_dim, generator=g).to(dtype)
    q = torch.randn(9, heads, head_dim, generator=g).to(dtype)
    tokens = torch.tensor([0, 2, 5, 8])                  # decode tokens among others (a prompt's rows)
    slots = torch.tensor([3, 0, 5, 1])
    last = torch.tensor([0, 63, 64, 149])                # one position, one block, one past it, many blocks
    out = torch.full_like(q, 7.0)
    triton_attention.decode_attention_(out, q, k_cache, v_cache, tokens, slots, last, head_dim ** -0.5,
                                       block_n=32 if precise else 64, precise=precise)
    expected = torch_reference(q, k_cache, v_cache, tokens, slots, last)
    tol = 1e-5 if dtype == torch.float32 else 1e-2 if precise else 3e-2
    torch.testing.assert_close(out[tokens], expected, atol=tol, rtol=tol)
    others = [i for i in range(9) if i not in tokens.tolist()]
    assert bool((out[others] == 7.0).all())             # rows of other tokens untouched


@pytest.fixture
def step_model():
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                         max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    return Decoder.from_state_dict(ModelConfig.from_hf_dict(hf_config.to_dict()), hf.state_dict())


def _steps(model):
    """Three sequences prefill (one of them chunked), then a step of two decode tokens beside a prompt chunk
    and a step of three decode tokens; returns each step's hidden states."""
    ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(5))
    cache = KVCache.for_model(model.config, 3, 64, torch.float32)
    out = []
    with torch.inference_mode():
        plan = StepPlan([StepSequence(0, 0, 30), StepSequence(1, 0, 40), StepSequence(2, 0, 39)],
                        torch.tensor([29, 69, 108]))
        tokens = torch.cat([ids[0, :30], ids[1], ids[2, :39]])
        positions = torch.cat([torch.arange(30), torch.arange(40), torch.arange(39)])
        out.append(model.forward_step(tokens, positions, plan, cache))
        plan = StepPlan([StepSequence(1, 40, 1), StepSequence(0, 30, 10), StepSequence(2, 39, 1)],
                        torch.tensor([0, 10, 11]))
        tokens = torch.cat([ids[1, 39:40], ids[0, 30:40], ids[2, 39:40]])
        positions = torch.cat([torch.tensor([40]), torch.arange(30, 40), torch.tensor([39])])
        out.append(model.forward_step(tokens, positions, plan, cache))
        plan = StepPlan([StepSequence(0, 40, 1), StepSequence(1, 41, 1), StepSequence(2, 40, 1)],
                        torch.tensor([0, 1, 2]))
        out.append(model.forward_step(ids[:, 0], torch.tensor([40, 41, 40]), plan, cache))
    return out


def test_forward_step_equals_torch_path(monkeypatch, step_model):
    monkeypatch.setattr(cpu_ops, "kernel", lambda: None)           # the torch path, not the C++ kernels
    monkeypatch.setattr(cuda_ops._KERNELS, "mode", "0")
    expected = _steps(step_model)
    calls = []
    real = triton_attention.decode_attention_
    monkeypatch.setattr(cuda_ops._KERNELS, "mode", "1")
    monkeypatch.setattr(triton_attention, "decode_attention_", lambda *a: calls.append(1) or real(*a))
    got = _steps(step_model)
    assert len(calls) == 2 * 2                               # two decode steps x two layers
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from service.model import triton_attention as ta
for dt in ("*bf16", "*fp32"):
    sig = dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, out_ptr=dt, tokens_ptr="*i64", slots_ptr="*i64", last_ptr="*i64",
               scale="fp32", head_dim="i32")
    for name in ("qt", "qh", "ks", "kh", "kt", "vs", "vh", "vt", "ot", "oh"):
        sig["stride_" + name] = "i32"
    for precise in ((True, False) if dt == "*bf16" else (True,)):
        consts = dict(GROUP=4, BLOCK_G=16, BLOCK_N=64, BLOCK_D=64, PRECISE=precise, EMULATE=False)
        compiled = triton.compile(ASTSource(fn=ta._decode_attention_kernel, signature=dict(sig, **{
            k: "constexpr" for k in consts}), constexprs=consts), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"]
print("compiled")
"""


def test_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
