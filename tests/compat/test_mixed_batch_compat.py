"""Differential tests for `ac.mixed_batch`: each row of a batch uses its own adapter (LoRA, IA3 or none).

References, in increasing independence from the library under test:
1. the same row run alone through adapters_core with that adapter active (`ac.set_adapter`),
2. PEFT's model holding that adapter alone (LoRA and IA3),
3. PEFT's own mixed batch (`adapter_names=[...]`, LoRA only: PEFT allows one peft_type per model).
The adapters differ in rank, scaling (rsLoRA, alpha_pattern, rank_pattern), dropout and targets (lm_head too).
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import adapters_core as ac
from _oracle import ATOL, close, adapter_params, assert_differs, input_ids, logits, make_peft_adapter, tiny_llama

LORA_CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"]),
    "c": dict(
        r=2,
        lora_alpha=4,
        lora_dropout=0.1,  # must be inactive in eval mode
        target_modules=["v_proj", "up_proj", "down_proj"],
        alpha_pattern={"layers.1.mlp.down_proj": 32},
    ),
    "d": dict(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], rank_pattern={"lm_head": 3}),
}
IA3_CONFIGS = {
    "ia3_1": dict(target_modules=["k_proj", "v_proj"], feedforward_modules=[]),
    "ia3_2": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}
ROW_NAMES = ["a", "ia3_1", "__base__", "b", "c", "ia3_2", "d", "a"]
LORA_ROW_NAMES = ["a", "__base__", "b", "c", "d", "a", "__base__", "c"]
SEQ = 6


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The base model, every adapter saved by PEFT, and each adapter's PEFT model (reference alone)."""
    root = tmp_path_factory.mktemp("mixed_zoo")
    base = tiny_llama(seed=0)
    dirs, refs = {}, {}
    for i, (name, kw) in enumerate(sorted(LORA_CONFIGS.items())):
        dirs[name] = root / name
        refs[name] = make_peft_adapter(base, peft.LoraConfig(**kw), dirs[name], seed=100 + i)
    for i, (name, kw) in enumerate(sorted(IA3_CONFIGS.items())):
        dirs[name] = root / name
        refs[name] = make_peft_adapter(base, peft.IA3Config(**kw), dirs[name], seed=200 + i)
    return base, dirs, refs


def _core_model(zoo, names):
    base, dirs, _ = zoo
    model = copy.deepcopy(base)
    for name in names:
        ac.load_adapter(model, str(dirs[name]), adapter_name=name)
    return model.eval()


def _rows(n, seed=7):
    return input_ids(batch=n, seq=SEQ, seed=seed)


def _run_mixed(model, ids, names):
    with ac.mixed_batch(model, names):
        return logits(model, ids)


def _row_alone(model, ids_row, name):
    """One row through adapters_core with `name` active (or adapters disabled for "__base__")."""
    if name == "__base__":
        ac.disable_adapters(model)
        try:
            return logits(model, ids_row)
        finally:
            ac.enable_adapters(model)
    ac.set_adapter(model, name)
    return logits(model, ids_row)


def _rows_alone(model, ids, names):
    return torch.cat([_row_alone(model, ids[i : i + 1], n) for i, n in enumerate(names)])


def _peft_rows_alone(zoo, ids, names):
    base, _, refs = zoo
    return torch.cat([logits(base if n == "__base__" else refs[n], ids[i : i + 1]) for i, n in enumerate(names)])


def test_rows_differ_between_adapters(zoo):
    """Guard: every adapter moves the logits, so a row that used the wrong adapter cannot pass."""
    base, _, refs = zoo
    ids = _rows(1)
    outs = {"__base__": logits(base, ids), **{n: logits(m, ids) for n, m in refs.items()}}
    names = sorted(outs)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert_differs(outs[x], outs[y])


def test_mixed_batch_matches_rows_alone(zoo):
    model = _core_model(zoo, [*LORA_CONFIGS, *IA3_CONFIGS])
    ids = _rows(len(ROW_NAMES))
    mixed = _run_mixed(model, ids, ROW_NAMES)
    close(mixed, _rows_alone(model, ids, ROW_NAMES))


def test_mixed_batch_matches_peft_single_adapter_models(zoo):
    """LoRA and IA3 rows each equal PEFT's model holding only that adapter."""
    model = _core_model(zoo, [*IA3_CONFIGS, *LORA_CONFIGS])  # other load order than above
    ids = _rows(len(ROW_NAMES), seed=8)
    close(_run_mixed(model, ids, ROW_NAMES), _peft_rows_alone(zoo, ids, ROW_NAMES))


def test_lora_mixed_batch_matches_peft_mixed_batch(zoo):
    base, dirs, _ = zoo
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["a"]), adapter_name="a")
    for name in ["b", "c", "d"]:
        pm.load_adapter(str(dirs[name]), adapter_name=name)
    pm.eval()
    ids = _rows(len(LORA_ROW_NAMES), seed=9)
    with torch.no_grad():
        expected = pm(input_ids=ids, adapter_names=LORA_ROW_NAMES).logits

    model = _core_model(zoo, list(LORA_CONFIGS))
    close(_run_mixed(model, ids, LORA_ROW_NAMES), expected)


def test_mixed_batch_leaves_active_adapter_unchanged(zoo):
    model = _core_model(zoo, ["a", "ia3_2"])
    ac.set_adapter(model, "ia3_2")
    ids = _rows(3, seed=10)
    before = logits(model, ids)
    _run_mixed(model, ids, ["a", "__base__", "a"])
    assert ac.active_adapters(model) == ["ia3_2"]
    close(logits(model, ids), before)


def test_mixed_batch_unknown_name_raises(zoo):
    model = _core_model(zoo, ["a", "ia3_1"])
    ids = _rows(3)
    with pytest.raises(ValueError, match="nope"):
        with ac.mixed_batch(model, ["a", "nope", "__base__"]):
            model(input_ids=ids)


def test_mixed_batch_wrong_length_raises(zoo):
    model = _core_model(zoo, ["a", "ia3_1"])
    ids = _rows(3)
    with pytest.raises(Exception):
        with ac.mixed_batch(model, ["a", "ia3_1"]):
            model(input_ids=ids)


def test_mixed_batch_after_delete_and_readd(zoo):
    """Delete adapters and re-add the names with other weights, ranks and targets: no stale cache."""
    base, dirs, refs = zoo
    model = _core_model(zoo, ["a", "b", "ia3_1"])
    names = ["a", "b", "ia3_1", "__base__", "b"]
    ids = _rows(len(names), seed=11)
    first = _run_mixed(model, ids, names)
    close(first, _peft_rows_alone(zoo, ids, names))

    ac.delete_adapter(model, "b")
    ac.delete_adapter(model, "ia3_1")
    ac.load_adapter(model, str(dirs["c"]), adapter_name="b")  # r=2, other targets, dropout, alpha_pattern
    ac.load_adapter(model, str(dirs["ia3_2"]), adapter_name="ia3_1")  # feedforward vector on down_proj
    second = _run_mixed(model, ids, names)

    renamed = {"b": "c", "ia3_1": "ia3_2"}
    close(second, _peft_rows_alone(zoo, ids, [renamed.get(n, n) for n in names]))
    close(second, _rows_alone(model, ids, names))
    assert_differs(second[1], first[1])


def test_mixed_batch_sees_in_place_weight_updates(zoo):
    model = _core_model(zoo, ["a", "c", "ia3_2"])
    names = ["a", "c", "ia3_2", "__base__"]
    ids = _rows(len(names), seed=12)
    first = _run_mixed(model, ids, names)

    lora_b = adapter_params(model, "a", "lora_B")
    ia3 = adapter_params(model, "ia3_2", "ia3_l")
    assert lora_b and ia3, "adapter parameters not found under PEFT's names"
    with torch.no_grad():
        for _, p in lora_b + ia3:
            p.mul_(2)
    second = _run_mixed(model, ids, names)

    close(second, _rows_alone(model, ids, names))
    assert_differs(second[0], first[0])
    assert_differs(second[2], first[2])
    close(second[1], first[1])
    close(second[3], first[3])


@pytest.mark.parametrize("order", ["lora_first", "ia3_first"])
def test_lora_and_ia3_on_same_layers(tmp_path, order):
    """A LoRA and an IA3 adapter wrap the same modules: each alone, and both in one mixed batch, equal
    PEFT's model holding that adapter alone."""
    base = tiny_llama(seed=1)
    targets = ["q_proj", "v_proj", "down_proj"]
    refs = {
        "L": make_peft_adapter(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), tmp_path / "L", seed=31),
        "I": make_peft_adapter(
            base, peft.IA3Config(target_modules=targets, feedforward_modules=["down_proj"]), tmp_path / "I", seed=32
        ),
    }
    model = copy.deepcopy(base)
    for name in (["L", "I"] if order == "lora_first" else ["I", "L"]):
        ac.load_adapter(model, str(tmp_path / name), adapter_name=name)
    model.eval()

    ids = _rows(4, seed=13)
    for name in ["L", "I"]:
        ac.set_adapter(model, name)
        close(logits(model, ids), logits(refs[name], ids))

    names = ["L", "I", "__base__", "I"]
    expected = torch.cat(
        [logits(base if n == "__base__" else refs[n], ids[i : i + 1]) for i, n in enumerate(names)]
    )
    close(_run_mixed(model, ids, names), expected)


def test_mixed_batch_embedding_lora_matches_peft(tmp_path):
    """LoRA on embed_tokens (PEFT's lora_embedding_A/B) in a mixed batch equals PEFT's mixed batch."""
    base = tiny_llama(seed=2)
    cfg_e = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    cfg_q = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"])
    make_peft_adapter(base, cfg_e, tmp_path / "e", seed=41)
    make_peft_adapter(base, cfg_q, tmp_path / "q", seed=42)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "e"), adapter_name="e")
    pm.load_adapter(str(tmp_path / "q"), adapter_name="q")
    pm.eval()
    names = ["e", "__base__", "q", "e"]
    ids = _rows(len(names), seed=14)
    with torch.no_grad():
        expected = pm(input_ids=ids, adapter_names=names).logits
    assert_differs(expected[0], expected[1])

    model = copy.deepcopy(base)
    ac.load_adapter(model, str(tmp_path / "e"), adapter_name="e")
    ac.load_adapter(model, str(tmp_path / "q"), adapter_name="q")
    model.eval()
    close(_run_mixed(model, ids, names), expected)
