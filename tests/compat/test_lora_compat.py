"""Differential tests of adapters_core's LoRA against PEFT: an adapter saved by PEFT and loaded here into a
plain copy of the same base model must give PEFT's logits (fp32: atol 1e-5), an adapter saved here must
load in PEFT with the same logits and the same checkpoint keys, and the state-dict functions must agree
with PEFT's key for key. Each comparison also checks that the adapter moves the logits, so a loader that
silently ignored the adapter would fail.
"""
import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adapters_core as ac

from conftest import (
    LLAMA_PROJECTIONS,
    assert_adapter_changes_output,
    assert_logits_close,
    clone_base,
    logits_of,
    make_dummy_model,
    make_peft_adapter,
    make_peft_adapter_and_fresh_base,
    make_tiny_gpt2,
    make_tiny_llama,
    strip_peft_prefix,
)

# bf16 tolerance, measured on this setup (tiny Llama below, peft 0.21.2, torch 2.13 CPU): |logits| < 0.4,
# where one bf16 ulp is 2^-9..2^-8 (0.002-0.004). Legitimate choices of operation order move the logits
# by 1-2 ulps: peft in bf16 vs the same weights in fp32 differ by 3.3e-3; peft's LoRA forward with the fp32
# delta cast to bf16 before the add (as peft's own mixed-batch path does) differs from peft's normal path
# by 3.9e-3; merged bf16 weights differ by 2.9e-3. 1e-2 leaves ~2.5x margin over those and is still ~60x
# below the adapter's effect (~0.6), so a wrong scale, target or missing adapter fails. A missing fp32
# upcast (5.9e-3) would pass this tolerance, which is why the bf16 test also checks the adapter dtype.
# (adapters_core's unmerged path currently matches PEFT's bf16 logits bit for bit.)
BF16_ATOL = 1e-2


def load_ours(fresh_base, path, **kwargs):
    ac.load_adapter(fresh_base, str(path), **kwargs)
    return fresh_base.eval()


def check_matches_peft(peft_model, path, fresh_base, input_ids, **load_kwargs):
    """Loads `path` into `fresh_base` with our loader and compares its logits with `peft_model`'s."""
    base_logits = logits_of(fresh_base, input_ids)
    expected = logits_of(peft_model.eval(), input_ids)
    assert_adapter_changes_output(expected, base_logits)
    ours = load_ours(fresh_base, path, **load_kwargs)
    assert_logits_close(logits_of(ours, input_ids), expected)
    return ours


def assert_same_adapter_state_dict(ours, peft_model, compare_values=True):
    theirs = strip_peft_prefix(peft.get_peft_model_state_dict(peft_model))
    mine = ac.get_peft_model_state_dict(ours)
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert mine[key].shape == value.shape, key
        assert mine[key].dtype == value.dtype, key
        if compare_values:
            torch.testing.assert_close(mine[key], value, atol=0, rtol=0, msg=key)


def llama_lora_config(**overrides):
    kwargs = dict(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM")
    kwargs.update(overrides)
    return peft.LoraConfig(**kwargs)


# 1
def test_dummy_model_lora_on_linear_matches_peft(dummy_model, dummy_token_ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["linear"])
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(dummy_model, config, tmp_path)
    check_matches_peft(peft_model, path, fresh, dummy_token_ids)


# 2
def test_llama_lora_on_all_seven_projections_matches_peft(tiny_llama, token_ids, tmp_path):
    config = llama_lora_config(lora_dropout=0.1)
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    check_matches_peft(peft_model, path, fresh, token_ids)


def test_llama_lora_loaded_under_custom_adapter_name_matches_peft(tiny_llama, token_ids, tmp_path):
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, llama_lora_config(), tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids, adapter_name="custom")
    assert list(ac.active_adapters(ours)) == ["custom"]


# 3
def test_llama_rslora_matches_peft(tiny_llama, token_ids, tmp_path):
    # r=16 makes alpha/sqrt(r)=4 differ clearly from alpha/r=1.
    config = llama_lora_config(r=16, lora_alpha=16, use_rslora=True)
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    check_matches_peft(peft_model, path, fresh, token_ids)


# 4
def test_llama_dora_matches_peft(tiny_llama, token_ids, tmp_path):
    config = llama_lora_config(use_dora=True)
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    check_matches_peft(peft_model, path, fresh, token_ids)


# 5
def test_llama_rank_pattern_and_alpha_pattern_match_peft(tiny_llama, token_ids, tmp_path):
    config = llama_lora_config(
        rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32}
    )
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    assert_same_adapter_state_dict(ours, peft_model)
    sd = ac.get_peft_model_state_dict(ours)
    assert sd["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert sd["model.layers.1.mlp.down_proj.lora_A.weight"].shape == (2, 64)
    assert sd["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (8, 64)


# 6
@pytest.mark.parametrize("layers_pattern", [None, "layers"])
def test_llama_layers_to_transform_matches_peft(tiny_llama, token_ids, tmp_path, layers_pattern):
    config = llama_lora_config(layers_to_transform=[1], layers_pattern=layers_pattern)
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    assert_same_adapter_state_dict(ours, peft_model)
    keys = ac.get_peft_model_state_dict(ours)
    assert keys and all(k.startswith("model.layers.1.") for k in keys)


# 7
def test_llama_regex_string_target_matches_peft(tiny_llama, token_ids, tmp_path):
    config = llama_lora_config(target_modules=r".*\.(q|v)_proj")
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    assert_same_adapter_state_dict(ours, peft_model)


# 8
def test_llama_all_linear_matches_peft_and_leaves_lm_head_alone(tiny_llama, token_ids, tmp_path):
    config = llama_lora_config(target_modules="all-linear")
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    assert_same_adapter_state_dict(ours, peft_model)
    assert not any(k.startswith("lm_head") for k in ac.get_peft_model_state_dict(ours))


# PEFT saves the expanded module names, not "all-linear", so the two tests above load exact names; this
# one checks our own "all-linear" expansion against PEFT's when injecting from a config.
@pytest.mark.parametrize("model_factory", [make_tiny_llama, make_dummy_model], ids=["llama", "dummy"])
@pytest.mark.parametrize("spelling", ["all-linear", "ALL-Linear"])
def test_inject_all_linear_adapts_the_same_modules_as_peft(model_factory, spelling):
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=spelling), model_factory())
    ours = ac.inject_adapter_in_model(ac.LoraConfig(r=4, target_modules=spelling), model_factory())
    expected = peft.get_peft_model_state_dict(theirs)
    actual = ac.get_peft_model_state_dict(ours)
    assert sorted(actual) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in actual.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_dummy_model_all_linear_targets_lm_head_too_like_peft(dummy_model, dummy_token_ids, tmp_path):
    # DummyModel is not a PreTrainedModel, so PEFT keeps its output layer among the "all-linear" targets.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(dummy_model, config, tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, dummy_token_ids)
    assert_same_adapter_state_dict(ours, peft_model)
    assert any(k.startswith("lm_head.") for k in ac.get_peft_model_state_dict(ours))


# 9
def test_llama_lora_on_embed_tokens_and_q_proj_matches_peft(tiny_llama, token_ids, tmp_path):
    config = llama_lora_config(target_modules=["embed_tokens", "q_proj"])
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    # PEFT's save_embedding_layers="auto" adds the full embed_tokens.base_layer.weight for a transformers model.
    assert_same_adapter_state_dict(ours, peft_model)
    assert "model.embed_tokens.base_layer.weight" in ac.get_peft_model_state_dict(ours)


# 10
def test_llama_modules_to_save_lm_head_matches_peft(tiny_llama, token_ids, tmp_path):
    # randomize_adapter_ fills the trainable lm_head copy too, so it differs from the base lm_head.
    config = llama_lora_config(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    saved = load_file(str(path / "adapter_model.safetensors"))
    assert not torch.equal(saved["base_model.model.lm_head.weight"], fresh.lm_head.weight)
    base_logits = logits_of(fresh, token_ids)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    # The checkpoint's lm_head must live in a per-adapter copy, not overwrite the base lm_head: with the
    # adapter disabled, PEFT and we are back to the base model's logits.
    with peft_model.disable_adapter():
        assert_logits_close(logits_of(peft_model, token_ids), base_logits)
    ac.disable_adapters(ours)
    assert_logits_close(logits_of(ours, token_ids), base_logits)


# 11
def test_llama_lora_bias_matches_peft(tiny_llama, token_ids, tmp_path):
    config = llama_lora_config(lora_bias=True)
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    assert_same_adapter_state_dict(ours, peft_model)


# 12
@pytest.mark.parametrize("fan_in_fan_out", [True, False])  # PEFT forces True for Conv1D either way.
def test_gpt2_conv1d_lora_on_c_attn_and_c_proj_matches_peft(tiny_gpt2, token_ids, tmp_path, fan_in_fan_out):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_gpt2, config, tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    assert_same_adapter_state_dict(ours, peft_model)


# 13
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_llama_bf16_base_and_bf16_adapter_match_peft(tiny_llama, token_ids, tmp_path, autocast_adapter_dtype):
    fresh_fp32 = clone_base(tiny_llama)
    make_peft_adapter(tiny_llama, llama_lora_config(), tmp_path, save_dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    base_bf16 = clone_base(fresh_fp32).to(torch.bfloat16)
    peft_model = peft.PeftModel.from_pretrained(
        clone_base(base_bf16), str(tmp_path), autocast_adapter_dtype=autocast_adapter_dtype
    ).eval()
    expected = logits_of(peft_model, token_ids)
    assert expected.dtype == torch.bfloat16
    assert_adapter_changes_output(expected, logits_of(base_bf16, token_ids))

    ours = load_ours(base_bf16, tmp_path, autocast_adapter_dtype=autocast_adapter_dtype)
    adapter_dtype = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    assert {v.dtype for v in ac.get_peft_model_state_dict(ours).values()} == {adapter_dtype}
    assert ours.lm_head.weight.dtype == torch.bfloat16
    assert_logits_close(logits_of(ours, token_ids), expected, atol=BF16_ATOL)


# 14
REVERSE_CASES = {
    "dummy_linear": (make_dummy_model, dict(r=4, lora_alpha=8, target_modules=["linear"])),
    "dummy_all_linear": (make_dummy_model, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama_projections": (make_tiny_llama, dict(r=4, lora_alpha=8, target_modules=list(LLAMA_PROJECTIONS))),
    "llama_dora": (make_tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "gpt2_conv1d": (make_tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


def input_ids_for(model_factory):
    vocab = 10 if model_factory is make_dummy_model else 96
    return torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(99))


def inject_and_save_ours(model_factory, kwargs, directory):
    """Injects with adapters_core (init_lora_weights=False: random, non-identity B) and saves.
    Returns (our model, a fresh copy of the base, input ids, base logits)."""
    base = model_factory()
    fresh = clone_base(base)
    input_ids = input_ids_for(model_factory)
    base_logits = logits_of(base, input_ids)
    ac.inject_adapter_in_model(ac.LoraConfig(init_lora_weights=False, **kwargs), base)
    ours = base.eval()
    ac.save_adapter(ours, str(directory))
    return ours, fresh, input_ids, base_logits


@pytest.mark.parametrize("case", sorted(REVERSE_CASES))
def test_adapter_saved_by_us_loads_in_peft_with_same_outputs(tmp_path, case):
    model_factory, kwargs = REVERSE_CASES[case]
    ours, fresh, input_ids, base_logits = inject_and_save_ours(model_factory, kwargs, tmp_path)
    ours_logits = logits_of(ours, input_ids)
    assert_adapter_changes_output(ours_logits, base_logits)

    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    assert_logits_close(logits_of(peft_model, input_ids), ours_logits)


@pytest.mark.parametrize("case", sorted(REVERSE_CASES))
def test_adapter_saved_by_us_has_peft_keys_shapes_and_config(tmp_path, case):
    model_factory, kwargs = REVERSE_CASES[case]
    inject_and_save_ours(model_factory, kwargs, tmp_path / "ours")
    peft_model = peft.get_peft_model(model_factory(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    peft_model.save_pretrained(str(tmp_path / "peft"))

    ours_sd = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_sd = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(ours_sd) == sorted(peft_sd)
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in peft_sd.items()}
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours_json["peft_type"] == "LORA"
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert isinstance(loaded, peft.LoraConfig)
    assert loaded.r == kwargs["r"] and loaded.lora_alpha == kwargs["lora_alpha"]
    # Compare with the config PEFT saves for the same setup: for "all-linear" PEFT stores the expanded names.
    peft_saved = peft.PeftConfig.from_pretrained(str(tmp_path / "peft"))
    assert set(loaded.target_modules) == set(peft_saved.target_modules)
    assert loaded.use_dora == kwargs.get("use_dora", False)
    assert loaded.inference_mode is True


# 15
def test_get_peft_model_state_dict_keys_and_tensors_match_peft(tiny_llama, token_ids, tmp_path):
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, llama_lora_config(), tmp_path)
    ours = check_matches_peft(peft_model, path, fresh, token_ids)
    assert_same_adapter_state_dict(ours, peft_model)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in ac.get_peft_model_state_dict(ours)


# 16
def assert_injected_on_meta_then_materialised(model, config, state_dict, n_base_params, dtype):
    ac.inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    real = [name for name, p in model.named_parameters() if not p.is_meta]
    assert len(meta) == len(state_dict), meta  # exactly the adapter tensors live on meta
    assert len(real) == n_base_params  # the base stayed where it was

    result = ac.set_peft_model_state_dict(model, state_dict, low_cpu_mem_usage=True)
    assert list(result.unexpected_keys) == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    params = list(model.named_parameters())
    assert not [name for name, p in params if p.is_meta]
    assert {p.device for _, p in params} == {torch.device("cpu")}
    assert {p.dtype for _, p in params} == {dtype}
    assert {v.dtype for v in ac.get_peft_model_state_dict(model).values()} == {dtype}
    return model.eval()


def test_low_cpu_mem_usage_inject_keeps_adapter_on_meta_until_state_dict_then_matches_peft(
    tiny_llama, token_ids, tmp_path
):
    kwargs = dict(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS))
    n_base_params = len(list(tiny_llama.parameters()))
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, peft.LoraConfig(**kwargs), tmp_path)
    state_dict = load_file(str(path / "adapter_model.safetensors"))
    expected = logits_of(peft_model, token_ids)
    assert_adapter_changes_output(expected, logits_of(fresh, token_ids))

    ours = assert_injected_on_meta_then_materialised(
        fresh, ac.LoraConfig(**kwargs), state_dict, n_base_params, torch.float32
    )
    assert_logits_close(logits_of(ours, token_ids), expected)


def test_low_cpu_mem_usage_state_dict_is_cast_to_bf16_base_dtype_like_peft(tiny_llama, token_ids, tmp_path):
    # An fp32 checkpoint materialised on a bf16 base must become bf16 (PEFT's
    # _move_adapter_to_device_of_base_layer), and match PEFT's own functional low_cpu_mem_usage path.
    kwargs = dict(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS))
    n_base_params = len(list(tiny_llama.parameters()))
    _, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, peft.LoraConfig(**kwargs), tmp_path)
    state_dict = load_file(str(path / "adapter_model.safetensors"))
    assert {v.dtype for v in state_dict.values()} == {torch.float32}
    base_bf16 = clone_base(fresh).to(torch.bfloat16)

    reference = clone_base(base_bf16)
    peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), reference, low_cpu_mem_usage=True)
    peft.set_peft_model_state_dict(reference, dict(state_dict), low_cpu_mem_usage=True)
    expected = logits_of(reference.eval(), token_ids)
    assert_adapter_changes_output(expected, logits_of(base_bf16, token_ids))

    ours = assert_injected_on_meta_then_materialised(
        base_bf16, ac.LoraConfig(**kwargs), dict(state_dict), n_base_params, torch.bfloat16
    )
    assert_logits_close(logits_of(ours, token_ids), expected, atol=BF16_ATOL)


@pytest.mark.parametrize("init", ["orthogonal", "mica", "eva"])
def test_inits_that_leave_the_base_alone_load_and_start_as_peft(tiny_llama, token_ids, tmp_path, init):
    """PEFT's "orthogonal", "mica" and "eva" inits leave the base weights as they are (unlike PiSSA, OLoRA, CorDA,
    LoftQ and LoRA-GA, which stay refused): an adapter trained with them is plain LoRA and loads as PEFT serves
    it; injected fresh here, as in PEFT, its B @ A is zero (MiCA's B: the base weight's minor singular vectors)."""
    targets = ["q_proj", "v_proj"] + (["embed_tokens"] if init == "mica" else [])
    config = llama_lora_config(r=4, target_modules=targets, init_lora_weights=init)
    plain = clone_base(tiny_llama)
    peft_model, path, fresh = make_peft_adapter_and_fresh_base(tiny_llama, config, tmp_path)
    check_matches_peft(peft_model, path, fresh, token_ids)
    base_logits = logits_of(plain, token_ids)
    ac.inject_adapter_in_model(ac.config_from_dict(json.loads((path / "adapter_config.json").read_text())), plain)
    assert_logits_close(logits_of(plain, token_ids), base_logits)
    if init == "mica":
        weight = plain.model.layers[0].self_attn.q_proj.base_layer.weight.float()
        u, _, _ = torch.linalg.svd(weight, full_matrices=False)
        b = plain.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        torch.testing.assert_close(b, u[:, -4:])


def test_inits_that_rewrite_the_base_are_refused_naming_them():
    for init in ("pissa", "olora", "corda", "loftq", "lora_ga"):
        with pytest.raises(ac.UnsupportedFeatureError, match=f"init_lora_weights='{init}' rewrites the base"):
            ac.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init)
