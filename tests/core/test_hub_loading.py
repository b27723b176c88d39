"""load_adapter with a hub repo id resolves through huggingface_hub's cache, offline (HF_HUB_OFFLINE=1),
exactly as a downloaded adapter would be; no network is touched."""

import shutil

import pytest
import torch

import adapters_core as ac

from _models import input_ids, logits, save_peft_lora, tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(cache, repo_id, folder, revision="main", commit=COMMIT):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(folder / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(commit)


def test_repo_id_loads_from_offline_cache_like_the_folder(tmp_path, offline_cache):
    folder = save_peft_lora(tiny_llama(), tmp_path / "adapter")
    _fake_cache(offline_cache, "someone/tiny-lora", folder)
    from_folder, from_hub = tiny_llama(), tiny_llama()
    ac.load_adapter(from_folder, str(folder))
    ac.load_adapter(from_hub, "someone/tiny-lora")
    ids = input_ids()
    torch.testing.assert_close(logits(from_hub, ids), logits(from_folder, ids), atol=0, rtol=0)
    assert (logits(from_hub, ids) - logits(tiny_llama(), ids)).abs().max() > 1e-3


def test_repo_id_revision_selects_the_snapshot(tmp_path, offline_cache):
    main = save_peft_lora(tiny_llama(), tmp_path / "main", seed=1)
    other = save_peft_lora(tiny_llama(), tmp_path / "other", seed=2)
    _fake_cache(offline_cache, "someone/tiny-lora", main)
    repo = offline_cache / "models--someone--tiny-lora"
    second = "fedcba9876543210fedcba9876543210fedcba98"
    (repo / "snapshots" / second).mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(other / name, repo / "snapshots" / second / name)
    (repo / "refs" / "v2").write_text(second)
    a, b = tiny_llama(), tiny_llama()
    ac.load_adapter(a, "someone/tiny-lora", revision="v2")
    ac.load_adapter(b, str(other))
    ids = input_ids()
    torch.testing.assert_close(logits(a, ids), logits(b, ids), atol=0, rtol=0)


def test_unknown_repo_id_offline_is_a_clear_error(offline_cache):
    model = tiny_llama()
    with pytest.raises(ac.AdapterConfigError, match="nobody/missing"):
        ac.load_adapter(model, "nobody/missing")
    assert not getattr(model, "peft_config", {})
