"""Shared pieces of the differential tests against PEFT: tiny base models built from configs (no hub),
a PEFT adapter factory that gives every adapter parameter non-trivial values and saves it in PEFT's
format, and comparison helpers that also prove the adapter changes the output (so a match is not vacuous).
"""
import copy
import warnings

import peft
import pytest
import torch
import transformers
from torch import nn

# Every logit comparison in fp32 uses this absolute tolerance; the adapters move logits by ~0.1-1.
FP32_ATOL = 1e-5
# An adapter whose effect on the logits is below this would make a comparison meaningless.
MIN_ADAPTER_EFFECT = 1e-3

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DummyModel(nn.Module):
    """The model of PEFT's custom-models injection guide (with a ReLU between linear and head)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 10)
        self.linear = nn.Linear(10, 10)
        self.relu = nn.ReLU()
        self.lm_head = nn.Linear(10, 2)

    def forward(self, input_ids):
        x = self.embedding(input_ids)
        x = self.relu(self.linear(x))
        return self.lm_head(x)


def make_tiny_llama(dtype=torch.float32):
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def make_tiny_gpt2():
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def make_dummy_model():
    return DummyModel().eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture
def dummy_model():
    return make_dummy_model()


@pytest.fixture
def token_ids():
    """A batch of 3 sequences of 7 ids, valid for the tiny Llama and GPT-2 (vocab 96)."""
    return torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1234))


@pytest.fixture
def dummy_token_ids():
    """A batch of 3 sequences of 7 ids, valid for DummyModel (vocab 10)."""
    return torch.randint(0, 10, (3, 7), generator=torch.Generator().manual_seed(1234))


def clone_base(model):
    """An identical, independent copy of a base model, taken before PEFT wraps (and mutates) the original."""
    return copy.deepcopy(model).eval()


@torch.no_grad()
def randomize_adapter_(peft_model, std=0.1):
    """Give every trainable parameter of a fresh PEFT model small random values, so that lora_B (zero at
    init) and the modules_to_save copies matter. DoRA magnitudes are perturbed around their initial row
    norms instead of replaced, to stay a realistic magnitude vector."""
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_magnitude_vector" in name:
            param.mul_(1.0 + std * torch.randn_like(param))
        else:
            nn.init.normal_(param, std=std)


def make_peft_adapter(base, config, path, std=0.1, save_dtype=None):
    """Wrap `base` (in place) with peft.get_peft_model, randomise the adapter, save it with
    save_pretrained into `path` and return (peft_model in eval mode, path). With `save_dtype` the whole
    PEFT model is cast first, so the checkpoint on disk holds adapter tensors of that dtype."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(base, config)
    randomize_adapter_(peft_model, std=std)
    if save_dtype is not None:
        peft_model.to(save_dtype)
    peft_model.eval()
    peft_model.save_pretrained(str(path))
    return peft_model, path


def make_peft_adapter_and_fresh_base(base, config, path, **kwargs):
    """Like make_peft_adapter, but first keeps an untouched copy of the base for our loader.
    Returns (peft_model, path, fresh_base)."""
    fresh_base = clone_base(base)
    peft_model, path = make_peft_adapter(base, config, path, **kwargs)
    return peft_model, path, fresh_base


@torch.no_grad()
def logits_of(model, input_ids):
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def assert_adapter_changes_output(adapted_logits, base_logits, min_effect=MIN_ADAPTER_EFFECT):
    effect = (adapted_logits.float() - base_logits.float()).abs().max().item()
    assert effect > min_effect, f"adapter moves logits by only {effect:.3g}: the comparison would be vacuous"


def assert_logits_close(ours, reference, atol=FP32_ATOL):
    assert ours.shape == reference.shape
    assert ours.dtype == reference.dtype, f"dtype {ours.dtype} != {reference.dtype}"
    torch.testing.assert_close(ours, reference, atol=atol, rtol=0)


def strip_peft_prefix(state_dict, prefix="base_model.model."):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
