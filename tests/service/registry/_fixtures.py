"""Shared helpers for the registry tests: a tiny random transformers Llama, our Decoder built from its
weights, adapters made and saved by PEFT on the transformers model (real files), an inline engine runner,
an event recorder and a fingerprint of the model to prove that a refused adapter changed nothing."""
from __future__ import annotations

import asyncio
import copy
import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers

import adapters_core as ac
from inline_engine import inline_engine_call
from service.model.config import ModelConfig
from service.model.decoder import Decoder
from service.registry import AdapterRegistry, registration
from service.registry.store import SERVED_PREFIX

HF_KW = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=128)

PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_rank_pattern": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 rank_pattern={"down_proj": 6}),
    # the same largest rank as "lora" (4), with a lower one in one module
    "lora_low_pattern": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                rank_pattern={"v_proj": 2}),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8,
                                          target_modules=["q_proj", "v_proj"]),
}


def run(coro):
    return asyncio.run(coro)


@functools.lru_cache(maxsize=None)
def hf_base() -> transformers.LlamaForCausalLM:
    """The transformers base model (shared: only ever deep-copied)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW)).eval()
    torch.random.set_rng_state(state)
    return model


def config_of(hf: transformers.PretrainedConfig) -> ModelConfig:
    return ModelConfig.from_hf_dict(hf.to_dict())


def decoder() -> Decoder:
    """A fresh Decoder with the transformers base model's weights (the registry's served model)."""
    hf = hf_base()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    return Decoder.from_state_dict(config_of(hf.config), state)


@dataclass(frozen=True)
class PeftAdapter:
    config: bytes
    weights: bytes
    model: peft.PeftModel           # the PEFT reference for this adapter alone

    def write(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_bytes(self.config)
        (folder / "adapter_model.safetensors").write_bytes(self.weights)
        return folder

    def config_dict(self) -> dict:
        return json.loads(self.config)


@functools.lru_cache(maxsize=None)
def peft_adapter(kind: str = "lora", seed: int = 0) -> PeftAdapter:
    """An adapter made by PEFT on the transformers model with random non-trivial weights, saved by PEFT."""
    pm = peft.get_peft_model(copy.deepcopy(hf_base()), PEFT_CONFIGS[kind]())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "ia3_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.eval()
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        folder = Path(tmp)
        return PeftAdapter((folder / "adapter_config.json").read_bytes(),
                           (folder / "adapter_model.safetensors").read_bytes(), pm)


class Events:
    """Records every registry event hook as a tuple (hook name, *args)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.load_seconds: dict[str, list[float]] = {}      # name -> each load's whole time
        self.reads: list[tuple] = []    # (name, wait for the loader, loader's time, wait for the loop after it)

    def adapter_loaded(self, name, seconds, from_tier):
        assert seconds >= 0
        self.calls.append(("loaded", name, from_tier))
        self.load_seconds.setdefault(name, []).append(seconds)

    def adapter_read(self, name, queued, seconds, resumed):
        self.reads.append((name, queued, seconds, resumed))

    def adapter_evicted(self, name, from_tier):
        self.calls.append(("evicted", name, from_tier))

    def adapter_uploaded(self, name):
        self.calls.append(("uploaded", name))

    def adapter_deleted(self, name):
        self.calls.append(("deleted", name))

    def adapter_load_failed(self, name):
        self.calls.append(("load_failed", name))

    def of(self, kind: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == kind]


def no_wrapping_ahead(monkeypatch) -> None:
    """Registrations and scans leave the model's layers unwrapped (`layer_wrap.py`; as they stay for targets
    whose wrap was undone, e.g. by a modules_to_save copy): a first load on them takes the general path, on the
    engine thread (where a test holds it with a slow engine)."""
    monkeypatch.setattr(registration, "wrap_key", lambda config: None)


def make_registry(root: Path, model=None, engine_call=inline_engine_call, **kw) -> AdapterRegistry:
    return AdapterRegistry(model if model is not None else decoder(), engine_call, str(root), **kw)


def fingerprint(model: torch.nn.Module) -> tuple:
    """Everything a load could change: state-dict keys and values, adapter names, slot table."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, sorted(getattr(model, "peft_config", {}) or {}), dict(ac.model_tree.slot_table(model).slot_of)


def assert_same_model(before: tuple, model: torch.nn.Module) -> None:
    state, names, slots = fingerprint(model)
    assert names == before[1] and slots == before[2]
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert torch.equal(v, before[0][k]), k


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, HF_KW["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def decoder_logits(model: Decoder, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    with ac.mixed_batch(model, [adapter] * ids.shape[0]):
        return model(ids).float()


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def lora_a_weight(model: torch.nn.Module, model_name: str) -> torch.Tensor:
    """The first layer's lora_A weight of adapter `model_name` (to see which mapping holds its factors)."""
    return next(m.lora_A[model_name].weight for m in model.modules()
                if hasattr(m, "lora_A") and model_name in getattr(m, "lora_A", {}))


def mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files whose mappings hold `tensor`'s first byte (Linux's /proc/self/maps)."""
    address, out = tensor.data_ptr(), set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end and len(parts) > 5:
                out.add(parts[5])
    return out


def served_file(registry: AdapterRegistry, name: str) -> Path:
    """Where adapter `name`'s served file is (or would be) for the registry's adapter dtype."""
    return Path(registry.store.served_path(registry.store.path(name), registry.adapter_dtype.factor_dtype))


async def store_with_served_files(root: Path, adapters: dict) -> None:
    """Each adapter registered in a CPU registry over `root` and loaded from its PEFT file once (room for one:
    each load evicts the last, so the second round reads the stored files), its served file written by the
    saver; the registry closed."""
    registry = make_registry(root, max_device_adapters=1, single_memory=True)
    for name, adapter in adapters.items():
        await registry.register_files(name, adapter.config, adapter.weights)
    for _ in range(2):
        for name in adapters:
            registry.release(await registry.acquire(name))
    for name in adapters:
        await wait_for_file(served_file(registry, name))
    registry.close()


async def wait_for_file(path: Path) -> None:
    """Until `path` exists (a served file the saver thread writes after a load), at most ~4 s."""
    for _ in range(200):
        if path.exists():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was not written")


def store_files(root: Path) -> list[str]:
    """Every path under the store, relative, sorted (to show that a refusal left nothing behind), but the served
    files a CPU registry's saver thread writes after a load read an adapter, when it gets to it
    (test_served_files.py)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith(SERVED_PREFIX)) \
        if root.exists() else []
