"""Shared pieces of the `gpu` tests: a tiny Llama (grouped-query attention, Llama-3 rope) as transformers'
model and as our Decoder on the same weights, PEFT adapter folders of every kind the CUDA path serves (LoRA
of several ranks and scalings, rsLoRA, DoRA, IA3) with non-trivial weights, and counters proving which
kernels ran: on CUDA the Triton kernels must run (a silent fallback to the torch path fails), on the CPU
only when `bench/gpu_check.py --dry-run` forces them under Triton's interpreter."""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

from service.model.config import ModelConfig
from service.model.decoder import Decoder

VOCAB = 128
LLAMA = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.08, tie_word_embeddings=False,
             rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=64, rope_theta=500000.0),
             bos_token_id=None, eos_token_id=None, pad_token_id=0)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORAS = {
    "r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r16rs": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"]),
    "r8all": dict(r=8, lora_alpha=32, target_modules=PROJECTIONS),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}
IA3 = {"ia3": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])}


def hf_llama(device, dtype=torch.float32, seed: int = 0) -> transformers.LlamaForCausalLM:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = None
    return model.to(device=device, dtype=dtype)


def our_decoder(hf: transformers.LlamaForCausalLM, device, dtype=torch.float32) -> Decoder:
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    state = {k: v.detach().to("cpu", torch.float32) for k, v in hf.state_dict().items()}
    return Decoder.from_state_dict(config, state, dtype=dtype, device=device, max_positions=512)


@torch.no_grad()
def peft_adapter_folders(hf: transformers.LlamaForCausalLM, root: Path) -> dict[str, Path]:
    """Every adapter of LORAS and IA3 written by PEFT from a CPU fp32 copy of `hf`, with weights drawn so each
    moves the logits (LoRA A/B 0.2 N(0,1), IA3 1 + 0.2 N(0,1), DoRA magnitudes x (1 + 0.1 N(0,1)))."""
    import peft

    base = copy.deepcopy(hf).to("cpu", torch.float32)
    folders = {}
    for i, (name, kw) in enumerate([*LORAS.items(), *IA3.items()]):
        config = peft.IA3Config(**kw) if name in IA3 else peft.LoraConfig(**kw)
        pm = peft.get_peft_model(copy.deepcopy(base), config)
        g = torch.Generator().manual_seed(100 + i)
        for pname, p in pm.named_parameters():
            if "lora_magnitude_vector" in pname:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "ia3_" in pname:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        folders[name] = root / name
        pm.save_pretrained(str(folders[name]))
    return folders


def triton_expected(device) -> bool:
    """Whether the Triton kernels must serve this device: always on CUDA; on the CPU when forced (dry run)."""
    if torch.device(device).type == "cuda":
        return True
    return (os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ADAPTERS_CORE_TRITON") == "1"
            and os.environ.get("ADAPTER_SERVE_TRITON") == "1")


@contextmanager
def kernel_counts():
    """Counts of the Triton SGMV and decode-attention launches inside the block: {"sgmv": n, "attention": n}."""
    from adapters_core import cuda_lora
    from service.model import cuda_ops

    counts = {"sgmv": 0, "attention": 0}
    lora_mod, attention_mod = cuda_lora.kernels(), cuda_ops.kernels()
    saved = []
    for key, mod, fn in (("sgmv", lora_mod, "add_lora_"), ("attention", attention_mod, "decode_attention_")):
        if mod is None:
            continue
        real = getattr(mod, fn)

        def counted(*args, _real=real, _key=key, **kwargs):
            counts[_key] += 1
            return _real(*args, **kwargs)
        saved.append((mod, fn, real))
        setattr(mod, fn, counted)
    try:
        yield counts
    finally:
        for mod, fn, real in saved:
            setattr(mod, fn, real)


@torch.no_grad()
def not_greedy_steps(model, prompt: list[int], tokens: list[int], device, slack: float = 1e-3) -> list[int]:
    """The steps at which `tokens` is not, within `slack`, the argmax of `model`'s (transformers / PEFT) logits
    after the prompt and the tokens before it: greedy decoding checked teacher-forced, so that a near tie
    between two tokens, which rounding differences between implementations may break either way, counts as
    greedy."""
    seq = torch.tensor([prompt + tokens[:-1]], device=device)
    logits = model(input_ids=seq).logits[0, len(prompt) - 1:].float()                     # [len(tokens), V]
    chosen = logits.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
    best = logits.max(dim=-1).values
    return (chosen < best - slack).nonzero()[:, 0].tolist()


def assert_greedy_under(model, prompt: list[int], tokens: list[int], device) -> None:
    steps = not_greedy_steps(model, prompt, tokens, device)
    assert not steps, f"not the reference's greedy choice at steps {steps}"
