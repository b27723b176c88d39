"""A tiny served model and real adapter files for the reliability tests, built in milliseconds without the hub.

`tiny_loaded()` is a `LoadedModel` the app serves like any other: a 2-layer random Llama over a byte-level
BPE tokenizer (256 byte tokens plus `<s>` / `</s>`, no merges) with a minimal chat template, so a server
starts and answers in well under a second. `make_adapter()` writes a PEFT LoRA folder for that model with
`adapters_core` (random non-zero weights), and `store_state()` is what must not change when a request fails.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

import adapters_core as ac
from inline_engine import inline_engine_call  # noqa: F401  (re-exported)
from service.model import LoadedModel, ModelConfig, Tokenizer, expected_shapes
from service.model.decoder import Decoder

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")
HF_CONFIG = dict(model_type="llama", vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                 bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)


def _tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


@functools.lru_cache(maxsize=None)
def tiny_loaded() -> LoadedModel:
    config = ModelConfig.from_hf_dict(HF_CONFIG)
    g = torch.Generator().manual_seed(0)
    state = {k: 0.2 * torch.randn(shape, generator=g) for k, shape in expected_shapes(config).items()}
    return LoadedModel(config=config, state_dict=state, tokenizer=_tokenizer(), chat_template=CHAT_TEMPLATE,
                       generation_config={"eos_token_id": 257}, name="tiny-llama")


def tiny_decoder() -> Decoder:
    loaded = tiny_loaded()
    return Decoder.from_state_dict(loaded.config, {k: v.clone() for k, v in loaded.state_dict.items()})


def make_adapter(folder: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA folder for the tiny model with random non-zero weights (distinct per seed)."""
    model = tiny_decoder()
    torch.manual_seed(seed)
    ac.inject_adapter_in_model(ac.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                             init_lora_weights=False), model, "x")
    ac.save_adapter(model, str(folder), "x")
    return Path(folder)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256) and every folder (-> "dir")."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = sha256(fh.read())
    return out


