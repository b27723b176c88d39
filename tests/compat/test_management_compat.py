"""Differential tests for adapter management: the same operation on a PEFT model and on a plain model
managed by adapters_core gives the same outputs (and the same active-adapter lists, dtypes, weights).

Covered: set_adapter, delete_adapter (incl. freeing memory), cast_adapter_dtype on a bf16 base,
disable/enable, merge/unmerge (LoRA, IA3, AdaLoRA), merge_and_unload, unload, add_weighted_adapter.
"""
from __future__ import annotations

import copy
import gc
import weakref

import peft
from peft.functional import cast_adapter_dtype as peft_cast_adapter_dtype
import pytest
import torch

import adapters_core as ac
from _oracle import (
    close,
    ATOL,
    adapter_params,
    assert_differs,
    base_weight_view,
    input_ids,
    is_adapter_segment,
    logits,
    make_peft_adapter,
    randomize_adapter_,
    tiny_llama,
)

LORA = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "v_proj", "up_proj"]),
    "c": dict(r=6, lora_alpha=12, target_modules=["v_proj", "o_proj", "down_proj"]),
}
IA3 = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
ADALORA = dict(init_r=4, target_r=2, total_step=10, lora_alpha=6, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mgmt_zoo")
    base = tiny_llama(seed=0)
    dirs = {}
    for i, (name, kw) in enumerate(LORA.items()):
        dirs[name] = root / name
        make_peft_adapter(base, peft.LoraConfig(**kw), dirs[name], seed=300 + i)
    dirs["ia3"] = root / "ia3"
    make_peft_adapter(base, peft.IA3Config(**IA3), dirs["ia3"], seed=310)
    dirs["ada"] = root / "ada"
    make_peft_adapter(base, peft.AdaLoraConfig(**ADALORA), dirs["ada"], seed=320)
    return base, dirs


@pytest.fixture
def ids():
    return input_ids(batch=2, seq=8, seed=5)


def _ours(zoo, names):
    """A plain copy of the base holding `names` loaded by adapters_core; first one active."""
    base, dirs = zoo
    ours = copy.deepcopy(base)
    for n in names:
        ac.load_adapter(ours, str(dirs[n]), adapter_name=n)
    ours.eval()
    ac.set_adapter(ours, names[0])
    return ours


def _pair(zoo, names):
    """(peft_model, our_model) holding the same adapters loaded from PEFT folders; first one active.
    PEFT allows one peft_type per model, so `names` must share a type."""
    base, dirs = zoo
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(dirs[n]), adapter_name=n)
    pm.eval()
    pm.set_adapter(names[0])
    return pm, _ours(zoo, names)


def _has_adapter_modules(model):
    return any(
        hasattr(m, "base_layer") or any(is_adapter_segment(s) for s in n.split("."))
        for n, m in model.named_modules()
    )


# -------------------------------------------------------------------------------------- set_adapter
def test_set_adapter_switching(zoo, ids):
    pm, ours = _pair(zoo, ["a", "b"])
    outs = {}
    for name in ["b", "a", "b"]:
        pm.set_adapter(name)
        ac.set_adapter(ours, name)
        assert ac.active_adapters(ours) == pm.active_adapters == [name]
        outs[name] = logits(pm, ids)
        close(logits(ours, ids), outs[name])
    assert_differs(outs["a"], outs["b"])

    pm.base_model.set_adapter(["a", "b"])
    ac.set_adapter(ours, ["a", "b"])
    assert sorted(ac.active_adapters(ours)) == ["a", "b"]
    both = logits(pm, ids)
    close(logits(ours, ids), both)
    assert_differs(both, outs["a"])


# ----------------------------------------------------------------------------------- delete_adapter
def test_delete_active_adapter_picks_same_successor_as_peft(tmp_path, ids):
    """PEFT activates the first remaining adapter in *sorted* order when the only active one is deleted;
    names are chosen so that sorted order differs from load order."""
    base = tiny_llama(seed=3)
    targets = ["q_proj", "v_proj"]
    for i, n in enumerate(["zeta", "alpha", "mid"]):
        make_peft_adapter(base, peft.LoraConfig(r=2 + i, lora_alpha=4, target_modules=targets), tmp_path / n, seed=330 + i)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "zeta"), adapter_name="zeta")
    ours = copy.deepcopy(base)
    for n in ["zeta", "alpha", "mid"]:
        if n != "zeta":
            pm.load_adapter(str(tmp_path / n), adapter_name=n)
        ac.load_adapter(ours, str(tmp_path / n), adapter_name=n)
    pm.eval()
    ours.eval()
    pm.set_adapter("mid")
    ac.set_adapter(ours, "mid")

    pm.delete_adapter("mid")
    new_active = ac.delete_adapter(ours, "mid")
    assert pm.active_adapters == ["alpha"]
    assert list(new_active) == pm.active_adapters
    assert ac.active_adapters(ours) == pm.active_adapters
    close(logits(ours, ids), logits(pm, ids))


def test_delete_one_of_two_active_keeps_the_other(zoo, ids):
    pm, ours = _pair(zoo, ["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    ac.set_adapter(ours, ["a", "b"])
    pm.delete_adapter("a")
    new_active = ac.delete_adapter(ours, "a")
    assert list(new_active) == pm.active_adapters == ["b"]
    close(logits(ours, ids), logits(pm, ids))


def test_deleted_adapter_is_freed(zoo, ids):
    _, ours = _pair(zoo, ["a", "b"])
    ac.set_adapter(ours, "b")
    with ac.mixed_batch(ours, ["b", "__base__"]):  # populate any serving caches before deleting
        logits(ours, ids)
    params = adapter_params(ours, "b")
    assert params, "adapter parameters not found under PEFT's names"
    ref = weakref.ref(params[0][1])
    n_before = sum(p.numel() for p in ours.parameters())
    del params
    ac.delete_adapter(ours, "b")
    gc.collect()
    assert ref() is None, "a parameter of the deleted adapter is still referenced"
    assert not adapter_params(ours, "b")
    assert sum(p.numel() for p in ours.parameters()) < n_before
    assert "b" not in ac.active_adapters(ours)
    try:  # PEFT raises KeyError for an unknown adapter name; an empty dict is as good
        leftover = ac.get_peft_model_state_dict(ours, adapter_name="b")
    except (KeyError, ValueError):
        leftover = {}
    assert not leftover


# -------------------------------------------------------------------------------- cast_adapter_dtype
def _dtypes(model, adapter):
    return {n.replace("base_model.model.", ""): p.dtype for n, p in adapter_params(model, adapter)}


@pytest.mark.parametrize("kind", ["a", "ia3"])
def test_load_into_bf16_base_upcasts_adapter_like_peft(zoo, ids, kind):
    base, dirs = zoo
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), str(dirs[kind])).eval()
    ours = copy.deepcopy(base).to(torch.bfloat16)
    ac.load_adapter(ours, str(dirs[kind]), autocast_adapter_dtype=True)
    expected = _dtypes(pm, "default")
    assert set(expected.values()) == {torch.float32}
    assert _dtypes(ours, "default") == expected
    # bf16 logits: the two libraries may round in a different order; bf16 has 8 bits of mantissa.
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=2e-2, rtol=2e-2)


def test_cast_adapter_dtype_after_inject_on_bf16(zoo):
    base, _ = zoo
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = copy.deepcopy(base).to(torch.bfloat16)
    peft.inject_adapter_in_model(peft.LoraConfig(**cfg), theirs)
    ours = copy.deepcopy(base).to(torch.bfloat16)
    ac.inject_adapter_in_model(ac.LoraConfig(**cfg), ours)
    assert set(_dtypes(theirs, "default").values()) == {torch.bfloat16}
    assert _dtypes(ours, "default") == _dtypes(theirs, "default")

    peft_cast_adapter_dtype(theirs, "default", autocast_adapter_dtype=True)
    ac.cast_adapter_dtype(ours, "default", autocast_adapter_dtype=True)
    assert set(_dtypes(theirs, "default").values()) == {torch.float32}
    assert _dtypes(ours, "default") == _dtypes(theirs, "default")
    assert all(p.dtype == torch.bfloat16 for n, p in base_weight_view(ours).items())


# ---------------------------------------------------------------------------------- disable / enable
@pytest.mark.parametrize("names", [["b", "a"], ["ia3"]])
def test_disable_enable(zoo, ids, names):
    base, _ = zoo
    pm, ours = _pair(zoo, names)
    with_adapter = logits(pm, ids)
    close(logits(ours, ids), with_adapter)

    ac.disable_adapters(ours)
    with pm.disable_adapter():
        disabled = logits(pm, ids)
    close(disabled, logits(base, ids))
    close(logits(ours, ids), disabled)
    ac.enable_adapters(ours)
    close(logits(ours, ids), with_adapter)
    assert ac.active_adapters(ours) == [names[0]]


# ---------------------------------------------------------------------------------- merge / unmerge
MERGE_CASES = {"lora": ["a", "b"], "ia3": ["ia3"], "adalora": ["ada"]}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_and_unmerge(zoo, ids, case):
    base, _ = zoo
    names = MERGE_CASES[case]
    pm, ours = _pair(zoo, names)
    if len(names) > 1:
        pm.base_model.set_adapter(names)
        ac.set_adapter(ours, names)
    unmerged = logits(ours, ids)
    close(unmerged, logits(pm, ids))
    assert_differs(unmerged, logits(base, ids))
    original = {k: v.clone() for k, v in base_weight_view(ours).items()}

    ac.merge_adapter(ours)
    pm.merge_adapter()
    merged = base_weight_view(ours)
    assert any((merged[k] - original[k]).abs().max() > 1e-4 for k in original), "merge changed no weight"
    close(logits(ours, ids), unmerged)
    close(logits(ours, ids), logits(pm, ids))
    theirs = base_weight_view(pm.base_model.model)
    for k in original:
        close(merged[k], theirs[k], atol=1e-6)

    ac.unmerge_adapter(ours)
    restored = base_weight_view(ours)
    for k, v in original.items():
        close(restored[k], v, atol=1e-6)
    close(logits(ours, ids), unmerged)


def test_merge_named_adapter_only(zoo, ids):
    pm, ours = _pair(zoo, ["a", "b"])
    ac.merge_adapter(ours, adapter_names=["b"])
    pm.merge_adapter(adapter_names=["b"])
    close(logits(ours, ids), logits(pm, ids))
    theirs = base_weight_view(pm.base_model.model)
    for k, v in base_weight_view(ours).items():
        close(v, theirs[k], atol=1e-6)


@pytest.mark.parametrize("names", [["a", "b"], ["ia3"]])
def test_merge_and_unload(zoo, ids, names):
    base, _ = zoo
    pm, ours = _pair(zoo, names)
    if len(names) > 1:
        pm.base_model.set_adapter(names)
        ac.set_adapter(ours, names)
    theirs = pm.merge_and_unload()
    plain = ac.merge_and_unload(ours)
    assert not _has_adapter_modules(plain)
    assert set(plain.state_dict()) == set(base.state_dict())
    expected = logits(theirs, ids)
    assert_differs(expected, logits(base, ids))
    close(logits(plain, ids), expected)
    for k, v in theirs.state_dict().items():
        close(plain.state_dict()[k], v, atol=1e-6)


def test_unload_restores_base(zoo, ids):
    base, _ = zoo
    ours = _ours(zoo, ["a", "ia3", "ada"])
    assert_differs(logits(ours, ids), logits(base, ids))
    plain = ac.unload(ours)
    assert not _has_adapter_modules(plain)
    assert set(plain.state_dict()) == set(base.state_dict())
    close(logits(plain, ids), logits(base, ids), atol=1e-6)


def test_unload_after_merge_matches_peft(zoo, ids):
    """PEFT's unload() does not unmerge: it swaps each layer for its base layer as is, so weights merged
    before keep the adapter. Same sequence on both sides gives the same model."""
    base, _ = zoo
    pm, ours = _pair(zoo, ["c"])
    pm.merge_adapter()
    ac.merge_adapter(ours)
    theirs = pm.unload()
    plain = ac.unload(ours)
    assert not _has_adapter_modules(plain)
    expected = logits(theirs, ids)
    assert_differs(expected, logits(base, ids))
    close(logits(plain, ids), expected)


# ---------------------------------------------------------------------------- add_weighted_adapter
def _merged_delta(model_weights, original):
    return {k: model_weights[k] - original[k] for k in original}


def _add_weighted_both(zoo, adapters, weights, combination_type):
    pm, ours = _pair(zoo, sorted(set(adapters)))
    pm.add_weighted_adapter(adapters, weights, adapter_name="mix", combination_type=combination_type)
    ac.add_weighted_adapter(ours, adapters, weights, "mix", combination_type)
    pm.set_adapter("mix")
    ac.set_adapter(ours, "mix")
    return pm, ours


@pytest.mark.parametrize(
    "adapters,weights,combination_type",
    [
        (["a", "b"], [0.7, 0.3], "linear"),
        (["a", "b"], [1.5, -0.5], "linear"),
        (["a", "c"], [0.6, 0.9], "cat"),
        (["b", "c"], [1.0, 0.5], "cat"),  # first adapter is rsLoRA: PEFT keeps use_rslora for the result
    ],
)
def test_add_weighted_adapter_matches_peft(zoo, ids, adapters, weights, combination_type):
    base, _ = zoo
    pm, ours = _add_weighted_both(zoo, adapters, weights, combination_type)
    expected = logits(pm, ids)
    assert_differs(expected, logits(base, ids))
    close(logits(ours, ids), expected)


def test_add_weighted_adapter_svd_delta_matches_peft(zoo, ids):
    """SVD: the factors are unique only up to signs, so compare the merged delta weights instead.

    Tolerance: the rank-k truncation U_k S_k V_k^T of the combined delta is unique when the singular values
    are separated (true for random weights) but two SVD runs agree only to ~eps32 * sigma_1 * sqrt(n)
    times a gap factor; with |delta| ~ 1 and n = 64 that is ~1e-5, so 1e-4 leaves a margin while still
    rejecting a wrong weight, scaling or rank (each moves the delta by > 1e-2).
    """
    base, _ = zoo
    pm, ours = _add_weighted_both(zoo, ["a", "c"], [0.8, 0.4], "svd")
    original = {k: v.clone() for k, v in base_weight_view(ours).items()}
    ac.merge_adapter(ours, adapter_names=["mix"])
    pm.merge_adapter(adapter_names=["mix"])
    ours_delta = _merged_delta(base_weight_view(ours), original)
    theirs_delta = _merged_delta(base_weight_view(pm.base_model.model), original)
    assert max(d.abs().max().item() for d in theirs_delta.values()) > 1e-2
    for k in original:
        close(ours_delta[k], theirs_delta[k], atol=1e-4)
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=1e-4, rtol=0)


def test_add_weighted_adapter_linear_needs_equal_ranks(zoo):
    """PEFT refuses `linear` for adapters of different rank (a: r=4, c: r=6)."""
    pm, ours = _pair(zoo, ["a", "c"])
    with pytest.raises(ValueError):
        pm.add_weighted_adapter(["a", "c"], [0.5, 0.5], adapter_name="mix", combination_type="linear")
    with pytest.raises(Exception, match="(?i)rank|\\br\\b"):
        ac.add_weighted_adapter(ours, ["a", "c"], [0.5, 0.5], "mix", "linear")
