"""Differential tests: IA3 and AdaLoRA adapters move between PEFT and adapters_core with equal logits.

Each adapter is made by PEFT on a tiny Llama with randomised (non-identity) weights and saved with
`save_pretrained`; adapters_core loads it into a deepcopy of the same base. The reverse direction saves
with `ac.save_adapter` and loads with `PeftModel.from_pretrained`. AdaLoRA is checked after a rank shrink
(a `rank_pattern` with a different number of kept ranks per module, not a prefix of the rows), which is
where PEFT slices tensors on save and re-creates layers with `r = sum(mask)` but the old `ranknum` on load.
"""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import adapters_core as ac
from _oracle import (
    ATOL,
    assert_differs,
    find_adapter_dir,
    input_ids,
    logits,
    make_peft_adapter,
    randomize_adapter_,
    tiny_llama,
)

IA3_CONFIGS = {
    "ia3_ff": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "ia3_no_ff": dict(target_modules=["k_proj", "v_proj", "o_proj", "up_proj"], feedforward_modules=[]),
}

INIT_R = 6
# Kept rank rows per AdaLoRA module, deliberately not prefixes and of different sizes (1, 2, 3, 5).
RANK_MASKS = [
    [False, False, True, False, False, False],
    [True, False, False, False, True, False],
    [False, True, True, False, False, True],
    [True, True, False, True, True, True],
]


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture
def base():
    return tiny_llama(seed=0)


@pytest.fixture
def ids():
    return input_ids(batch=3, seq=9, seed=3)


# ---------------------------------------------------------------------------------------------- IA3
@pytest.mark.parametrize("variant", sorted(IA3_CONFIGS))
def test_ia3_peft_to_core(base, ids, tmp_path, variant):
    fresh = copy.deepcopy(base)
    pm = make_peft_adapter(base, peft.IA3Config(**IA3_CONFIGS[variant]), tmp_path, seed=11)
    expected = logits(pm, ids)
    assert_differs(expected, logits(base, ids))

    ac.load_adapter(fresh, str(tmp_path))
    close(logits(fresh, ids), expected)


def test_ia3_feedforward_scales_input_not_output(base, ids, tmp_path):
    """The feedforward vector has shape (1, in) and scales the input; loading it as an output scale
    would fail on shape or give other logits."""
    pm = make_peft_adapter(base, peft.IA3Config(**IA3_CONFIGS["ia3_ff"]), tmp_path, seed=12)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    ff = [k for k in sd if "down_proj" in k]
    assert ff and all(sd[k].shape == (1, 64) for k in ff)
    fresh = copy.deepcopy(base)
    ac.load_adapter(fresh, str(tmp_path))
    close(logits(fresh, ids), logits(pm, ids))


@pytest.mark.parametrize("variant", sorted(IA3_CONFIGS))
def test_ia3_core_to_peft_roundtrip(base, ids, tmp_path, variant):
    """A PEFT-made IA3 adapter loaded here and saved by ac.save_adapter loads in PEFT with equal outputs."""
    pm = make_peft_adapter(base, peft.IA3Config(**IA3_CONFIGS[variant]), tmp_path / "src", seed=13)
    ours = copy.deepcopy(base)
    ac.load_adapter(ours, str(tmp_path / "src"))
    ac.save_adapter(ours, str(tmp_path / "out"))

    out_dir = find_adapter_dir(tmp_path / "out", "default")
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out_dir)).eval()
    close(logits(loaded, ids), logits(ours, ids))
    close(logits(loaded, ids), logits(pm, ids))


def test_ia3_core_injected_to_peft(base, ids, tmp_path):
    """An IA3 adapter created by ac.inject_adapter_in_model (not by PEFT) loads in PEFT with equal outputs."""
    ours = copy.deepcopy(base)
    ac.inject_adapter_in_model(ac.IA3Config(**IA3_CONFIGS["ia3_ff"]), ours)
    randomize_adapter_(ours, "default", seed=14)
    expected = logits(ours, ids)
    assert_differs(expected, logits(base, ids))
    ac.save_adapter(ours, str(tmp_path))

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(find_adapter_dir(tmp_path, "default"))).eval()
    close(logits(loaded, ids), expected)


# ------------------------------------------------------------------------------------------ AdaLoRA
def _adalora_config(**kw):
    return peft.AdaLoraConfig(init_r=INIT_R, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], **kw)


def _shrunk_adalora(base, directory, seed=21):
    """PEFT AdaLoRA with random A, E, B and a RankAllocator-style rank_pattern, saved to `directory`.

    RankAllocator.mask_to_budget names the pattern after `named_parameters()` of the inner model, i.e.
    `model.layers.0.self_attn.q_proj.lora_E.default` (no `base_model.model.` prefix, since AdaLoraModel
    passes `self.model`); `_get_adapter_state_dict` strips the adapter name on save. Returns the PEFT model
    with E masked in place (what `mask_using_rank_pattern` does after the final budget step), whose
    outputs therefore equal those of the saved, sliced adapter."""
    pm = peft.get_peft_model(copy.deepcopy(base), _adalora_config())
    randomize_adapter_(pm, "default", seed=seed)
    pm.eval()
    names = [n for n, _ in pm.base_model.model.named_parameters() if n.endswith("lora_E.default")]
    assert len(names) == len(RANK_MASKS)
    pattern = {n: mask for n, mask in zip(names, RANK_MASKS)}
    pm.peft_config["default"].rank_pattern = pattern
    pm.base_model.rankallocator.mask_using_rank_pattern(pm.base_model.model, pattern)
    pm.save_pretrained(str(directory))
    return pm


def test_adalora_rank_pattern_is_sliced_on_disk(base, tmp_path):
    """Guards the fixture: PEFT really saved sliced tensors with different ranks per module."""
    _shrunk_adalora(base, tmp_path)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    ranks = sorted(v.shape[0] for k, v in sd.items() if k.endswith("lora_E"))
    assert ranks == sorted(sum(m) for m in RANK_MASKS)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and len(cfg["rank_pattern"]) == len(RANK_MASKS)


def test_adalora_rank_pattern_peft_to_core(base, ids, tmp_path):
    pm = _shrunk_adalora(base, tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    expected = logits(reference, ids)
    close(expected, logits(pm, ids))  # PEFT agrees with itself: masked in memory == sliced on disk
    assert_differs(expected, logits(base, ids))

    ours = copy.deepcopy(base)
    ac.load_adapter(ours, str(tmp_path))
    close(logits(ours, ids), expected)


def test_adalora_without_rank_pattern_peft_to_core(base, ids, tmp_path):
    pm = make_peft_adapter(base, _adalora_config(lora_alpha=3), tmp_path, seed=22)
    ours = copy.deepcopy(base)
    ac.load_adapter(ours, str(tmp_path))
    expected = logits(pm, ids)
    assert_differs(expected, logits(base, ids))
    close(logits(ours, ids), expected)


def test_adalora_rank_pattern_core_to_peft(base, ids, tmp_path):
    """The shrunk adapter loaded here and saved by ac.save_adapter loads in PEFT with equal outputs."""
    pm = _shrunk_adalora(base, tmp_path / "src")
    ours = copy.deepcopy(base)
    ac.load_adapter(ours, str(tmp_path / "src"))
    ac.save_adapter(ours, str(tmp_path / "out"))

    out_dir = find_adapter_dir(tmp_path / "out", "default")
    assert json.loads((out_dir / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out_dir)).eval()
    close(logits(loaded, ids), logits(ours, ids))
    close(logits(loaded, ids), logits(pm, ids))


def test_adalora_core_injected_to_peft(base, ids, tmp_path):
    """An AdaLoRA adapter created by ac.inject_adapter_in_model loads in PEFT with equal outputs."""
    ours = copy.deepcopy(base)
    ac.inject_adapter_in_model(
        ac.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=5, target_modules=["q_proj", "v_proj", "up_proj"]),
        ours,
    )
    randomize_adapter_(ours, "default", seed=23)
    expected = logits(ours, ids)
    assert_differs(expected, logits(base, ids))
    ac.save_adapter(ours, str(tmp_path))

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(find_adapter_dir(tmp_path, "default"))).eval()
    close(logits(loaded, ids), expected)
