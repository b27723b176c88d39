"""Bad adapter input is refused with an error that names the problem, and never changes the model.

Fixtures are valid PEFT folders (written by peft's save_pretrained) corrupted one way each: no config,
config not JSON, unknown peft_type, targets that match nothing, tensors of the wrong shape, a truncated
safetensors file, a pickle that would run code, and config fields for PEFT features we do not implement.
"""
from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters_core as ac
from _models import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    input_ids,
    logits,
    read_config,
    save_peft_lora,
    tiny_llama,
    write_config,
)

BAD_SAFETENSORS = r"(?i)safetensors|truncat|corrupt|incomplete|deserializ|header|unreadable"


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def valid_dir(base, tmp_path_factory):
    """A valid LoRA folder on q/k/v (k_proj is not targeted by the 'good' adapter used below)."""
    return save_peft_lora(base, tmp_path_factory.mktemp("valid"), seed=1, target_modules=["q_proj", "k_proj", "v_proj"])


def _copy(valid_dir: Path, tmp_path: Path, name: str = "bad") -> Path:
    out = tmp_path / name
    shutil.copytree(valid_dir, out)
    return out


# ------------------------------------------------------------------------------------------ builders
def make_no_config(valid_dir, tmp_path):
    d = _copy(valid_dir, tmp_path)
    (d / CONFIG_NAME).unlink()
    return d


def make_not_json(valid_dir, tmp_path):
    d = _copy(valid_dir, tmp_path)
    (d / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 4,,, oops')
    return d


def make_peft_type(value):
    def build(valid_dir, tmp_path):
        d = _copy(valid_dir, tmp_path)
        cfg = read_config(d)
        cfg["peft_type"] = value
        write_config(d, cfg)
        return d

    return build


def make_no_targets(valid_dir, tmp_path):
    """Config targets and checkpoint keys both name a module the model does not have."""
    d = _copy(valid_dir, tmp_path)
    cfg = read_config(d)
    cfg["target_modules"] = ["nonexistent_proj"]
    write_config(d, cfg)
    sd = load_file(str(d / WEIGHTS_NAME))
    sd = {re.sub(r"\.(q|k|v)_proj\.", ".nonexistent_proj.", k): v for k, v in sd.items()}
    save_file(sd, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    return d


def make_wrong_shape(valid_dir, tmp_path):
    """Same keys, but one lora_A (layer 1 k_proj) has in_features 35 instead of 32."""
    d = _copy(valid_dir, tmp_path)
    sd = load_file(str(d / WEIGHTS_NAME))
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"
    assert sd[key].shape == (4, 32)
    sd[key] = torch.randn(4, 35)
    save_file(sd, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    return d


def make_truncated(valid_dir, tmp_path):
    d = _copy(valid_dir, tmp_path)
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    return d


def make_unsupported(field, value):
    def build(valid_dir, tmp_path):
        d = _copy(valid_dir, tmp_path)
        cfg = read_config(d)
        cfg[field] = value
        write_config(d, cfg)
        return d

    return build


class _Evil:
    """Unpickling this without weights_only would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def make_evil_bin(valid_dir, tmp_path):
    d = _copy(valid_dir, tmp_path)
    (d / WEIGHTS_NAME).unlink()
    marker = tmp_path / "pwned"
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Evil(str(marker))}
    with open(d / "adapter_model.bin", "wb") as fh:
        pickle.dump(sd, fh)
    return d


UNSUPPORTED = {
    "layer_replication": [[0, 1]],
    "target_parameters": ["x"],
    "init_lora_weights": "pissa",
    "trainable_token_indices": [1],
}

# (builder, regex the error message must match)
BAD = {
    "no_config": (make_no_config, r"adapter_config"),
    "not_json": (make_not_json, r"(?i)json"),
    "loha": (make_peft_type("LOHA"), r"LOHA"),
    "bogus_type": (make_peft_type("BOGUS"), r"BOGUS"),
    "no_targets": (make_no_targets, r"(?i)nonexistent_proj|target"),
    "wrong_shape": (make_wrong_shape, r"(?i)shape|size"),
    "truncated": (make_truncated, BAD_SAFETENSORS),
    "evil_bin": (make_evil_bin, r"(?i)weights_only|unpickl|pickle|safely|adapter_model\.bin"),
    **{f"unsupported_{k}": (make_unsupported(k, v), re.escape(k) if k != "init_lora_weights" else r"pissa|init_lora_weights")
       for k, v in UNSUPPORTED.items()},
}


# --------------------------------------------------------------------------------------------- tests
def test_valid_fixture_loads(base, valid_dir):
    """Guard: the uncorrupted folder loads and changes the outputs, so each failure below is due to its defect."""
    model = copy.deepcopy(base)
    ac.load_adapter(model, str(valid_dir))
    ids = input_ids()
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folder_raises_naming_the_problem(base, valid_dir, tmp_path, case):
    build, pattern = BAD[case]
    bad = build(valid_dir, tmp_path)
    model = copy.deepcopy(base)
    with pytest.raises(Exception, match=pattern):
        ac.load_adapter(model, str(bad))
    if case == "evil_bin":
        assert not (tmp_path / "pwned").exists(), "the pickle was executed"


def test_empty_folder_raises(base, tmp_path):
    with pytest.raises(Exception, match="adapter_config"):
        ac.load_adapter(copy.deepcopy(base), str(tmp_path))


def test_missing_folder_raises(base, tmp_path):
    with pytest.raises(Exception):
        ac.load_adapter(copy.deepcopy(base), str(tmp_path / "does_not_exist"))


@pytest.mark.parametrize("value", ["LOHA", "BOGUS"])
def test_load_config_unknown_peft_type(valid_dir, tmp_path, value):
    d = make_peft_type(value)(valid_dir, tmp_path)
    with pytest.raises(Exception, match=value):
        ac.load_config(str(d))


def test_load_config_not_json(valid_dir, tmp_path):
    d = make_not_json(valid_dir, tmp_path)
    with pytest.raises(Exception, match=r"(?i)json"):
        ac.load_config(str(d))


def test_inject_targets_matching_nothing(base):
    with pytest.raises(Exception, match=r"(?i)nonexistent_proj|target"):
        ac.inject_adapter_in_model(ac.LoraConfig(r=2, target_modules=["nonexistent_proj"]), copy.deepcopy(base))


# --------------------------------------------------------------------------------- unsupported fields
def _lora_dict(**extra):
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **extra}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_unsupported_feature_named_by_from_dict(field):
    pattern = re.escape(field) if field != "init_lora_weights" else r"pissa|init_lora_weights"
    with pytest.raises(Exception, match=pattern):
        ac.LoraConfig.from_dict(_lora_dict(**{field: UNSUPPORTED[field]}))


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_unsupported_feature_named_by_load_config(valid_dir, tmp_path, field):
    d = make_unsupported(field, UNSUPPORTED[field])(valid_dir, tmp_path)
    pattern = re.escape(field) if field != "init_lora_weights" else r"pissa|init_lora_weights"
    with pytest.raises(Exception, match=pattern):
        ac.load_config(str(d))


def test_supported_fields_and_defaults_are_accepted(valid_dir):
    """Controls for the tests above: a PEFT-written config (every field at its default, including the
    unsupported ones), use_dora=True and an unknown future key all parse."""
    cfg = read_config(valid_dir)
    assert "layer_replication" in cfg and "target_parameters" in cfg  # PEFT writes them as null
    parsed = ac.LoraConfig.from_dict(cfg)
    assert parsed.r == 4
    assert ac.LoraConfig.from_dict(_lora_dict(use_dora=True)).use_dora is True
    assert ac.LoraConfig.from_dict(_lora_dict(init_lora_weights="gaussian")).r == 4
    with pytest.warns(UserWarning):  # PEFT drops unknown keys with a warning
        future = ac.LoraConfig.from_dict(_lora_dict(some_future_field=123))
    assert not hasattr(future, "some_future_field")


# ------------------------------------------------------------------------------------ state dict keys
def test_unexpected_keys_reported_like_peft(base):
    from peft import LoraConfig as PeftLoraConfig
    from peft.functional import get_peft_model_state_dict as peft_get
    from peft.functional import inject_adapter_in_model as peft_inject
    from peft.functional import set_peft_model_state_dict as peft_set

    theirs = copy.deepcopy(base)
    peft_inject(PeftLoraConfig(r=2, target_modules=["q_proj"]), theirs)
    ours = copy.deepcopy(base)
    ac.inject_adapter_in_model(ac.LoraConfig(r=2, target_modules=["q_proj"]), ours)

    sd = {"base_model.model." + k: torch.randn_like(v) for k, v in peft_get(theirs).items()}
    extra = "base_model.model.model.layers.0.self_attn.nonexistent_proj.lora_A.weight"
    sd[extra] = torch.randn(2, 32)
    expected = peft_set(theirs, dict(sd))
    result = ac.set_peft_model_state_dict(ours, dict(sd))

    assert any("nonexistent_proj" in k for k in result.unexpected_keys)
    assert sorted(result.unexpected_keys) == sorted(expected.unexpected_keys)
    assert not [k for k in result.missing_keys if "lora_" in k]
    valid = {k.removeprefix("base_model.model.") for k in sd if k != extra}
    assert not valid & set(result.unexpected_keys)
    got = ac.get_peft_model_state_dict(ours)
    for k in valid:
        torch.testing.assert_close(got[k], sd["base_model.model." + k])


def test_set_state_dict_wrong_shape_raises_unless_ignored(base):
    ours = copy.deepcopy(base)
    ac.inject_adapter_in_model(ac.LoraConfig(r=2, target_modules=["q_proj"]), ours)
    sd = {k: torch.randn_like(v) for k, v in ac.get_peft_model_state_dict(ours).items()}
    key = next(k for k in sd if k.endswith("lora_A.weight"))
    bad = dict(sd)
    bad[key] = torch.randn(3, 32)
    with pytest.raises(Exception, match=r"(?i)shape|size"):
        ac.set_peft_model_state_dict(ours, bad)
    ac.set_peft_model_state_dict(ours, bad, ignore_mismatched_sizes=True)  # dropped with a warning, as PEFT
    assert ac.get_peft_model_state_dict(ours)[key].shape == (2, 32)


# ------------------------------------------------------------------------------ failure is atomic
def _snapshot(model, ids):
    return {
        "logits": logits(model, ids),
        "active": list(ac.active_adapters(model)),
        "good": {k: v.clone() for k, v in ac.get_peft_model_state_dict(model, adapter_name="good").items()},
        # adapter parameters only: leftover empty wrappers are checked by the state-dict-key test below
        "params": sorted(n for n, _ in model.named_parameters() if any(_is_adapter_seg(s) for s in n.split("."))),
    }


def _is_adapter_seg(segment: str) -> bool:
    return "lora_" in segment or segment.startswith("ia3_")


@pytest.fixture
def loaded(base, tmp_path):
    """A model serving adapter 'good' (q/v only) plus its outputs, to check failed loads against."""
    good = save_peft_lora(base, tmp_path / "good", seed=7)
    model = copy.deepcopy(base)
    ac.load_adapter(model, str(good), adapter_name="good")
    ac.set_adapter(model, "good")
    ids = input_ids(seed=4)
    snap = _snapshot(model, ids)
    assert (snap["logits"] - logits(base, ids)).abs().max() > 1e-3
    return model, ids, snap


ATOMIC_CASES = ["not_json", "bogus_type", "no_targets", "wrong_shape", "truncated", "unsupported_layer_replication"]


def _assert_unchanged(model, ids, snap):
    after = _snapshot(model, ids)
    assert after["active"] == snap["active"]
    assert after["params"] == snap["params"], "adapter parameters were added or removed"
    assert set(after["good"]) == set(snap["good"])
    for k, v in snap["good"].items():
        torch.testing.assert_close(after["good"][k], v, atol=0, rtol=0)
    torch.testing.assert_close(after["logits"], snap["logits"], atol=0, rtol=0)


@pytest.mark.parametrize("case", ATOMIC_CASES)
def test_failed_load_leaves_model_unchanged(loaded, valid_dir, tmp_path, case):
    model, ids, snap = loaded
    bad = BAD[case][0](valid_dir, tmp_path)
    with pytest.raises(Exception):
        ac.load_adapter(model, str(bad), adapter_name="bad")
    _assert_unchanged(model, ids, snap)
    with ac.mixed_batch(model, ["good", "__base__"]):
        both = logits(model, ids)
    torch.testing.assert_close(both[0], snap["logits"][0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        with ac.mixed_batch(model, ["bad", "good"]):
            logits(model, ids)


@pytest.mark.parametrize("case", ["wrong_shape", "truncated"])
def test_failed_load_under_existing_name_keeps_that_adapter(loaded, valid_dir, tmp_path, case):
    """A bad folder loaded under the name of an adapter already served must not damage that adapter."""
    model, ids, snap = loaded
    bad = BAD[case][0](valid_dir, tmp_path)
    with pytest.raises(Exception):
        ac.load_adapter(model, str(bad), adapter_name="good")
    _assert_unchanged(model, ids, snap)


def test_failed_load_leaves_state_dict_keys_unchanged(loaded, valid_dir, tmp_path):
    """The wrong-shape adapter targets k_proj, which 'good' does not: a rolled-back load must not leave
    k_proj wrapped (which would rename `k_proj.weight` to `k_proj.base_layer.weight`)."""
    model, ids, _ = loaded
    keys = sorted(model.state_dict())
    with pytest.raises(Exception):
        ac.load_adapter(model, str(make_wrong_shape(valid_dir, tmp_path)), adapter_name="bad")
    assert sorted(model.state_dict()) == keys
