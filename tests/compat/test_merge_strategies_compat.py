"""Differential tests of add_weighted_adapter's task-arithmetic family against PEFT: `linear`, `ties`,
`magnitude_prune` build exactly PEFT's merged factors (bit for bit, every layer, embeddings included) and the
same logits; DARE (`dare_linear`, `dare_ties`) draws random drops, so a layer's merge is compared with PEFT's
own layer merge under the same random stream. Bad arguments are refused as PEFT refuses them (or, where PEFT
fails with a TypeError, with an error naming the argument)."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import adapters_core as ac
from adapters_core.model_tree import adapter_layers
from adapters_core.task_arithmetic import combine_factors
from _oracle import assert_differs, close, input_ids, logits, make_peft_adapter, tiny_llama

LORA = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "b": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "v_proj", "up_proj", "embed_tokens"]),
    "c": dict(r=4, lora_alpha=6, target_modules=["v_proj", "o_proj", "down_proj"]),
    "r6": dict(r=6, lora_alpha=6, target_modules=["v_proj"]),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_zoo")
    base = tiny_llama(seed=0)
    dirs = {}
    for i, (name, kw) in enumerate(LORA.items()):
        dirs[name] = root / name
        make_peft_adapter(base, peft.LoraConfig(**kw), dirs[name], seed=500 + i)
    return base, dirs


def _pair(zoo, names):
    base, dirs = zoo
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(dirs[n]), adapter_name=n)
    ours = copy.deepcopy(base)
    for n in names:
        ac.load_adapter(ours, str(dirs[n]), adapter_name=n)
    return pm.eval(), ours.eval()


def _peft_factors(pm, name):
    out = {}
    for key, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            if name in module.lora_A:
                out[key] = (module.lora_A[name].weight, module.lora_B[name].weight)
            elif name in module.lora_embedding_A:
                out[key] = (module.lora_embedding_A[name], module.lora_embedding_B[name])
    return out


CASES = [
    (["a", "b", "c"], [0.7, 0.3, 0.5], "linear", None, "total"),
    (["a", "b"], [1.5, -0.5], "linear", None, "total"),
    (["a", "b", "c"], [0.6, 0.9, 0.4], "ties", 0.5, "total"),
    (["a", "b", "c"], [1.0, -0.7, 0.4], "ties", 0.3, "frequency"),
    (["a", "b"], [0.8, 0.6], "ties", 1.0, "total"),              # density 1: no pruning, signs still elected
    (["b", "c"], [0.5, 0.5], "magnitude_prune", 0.4, "total"),
]


@pytest.mark.parametrize("adapters,weights,strategy,density,sign", CASES)
def test_merge_equals_peft_bit_for_bit(zoo, adapters, weights, strategy, density, sign):
    base, _ = zoo
    pm, ours = _pair(zoo, sorted(set(adapters)))
    pm.add_weighted_adapter(adapters, weights, "mix", combination_type=strategy, density=density,
                            majority_sign_method=sign)
    ac.add_weighted_adapter(ours, adapters, weights, "mix", strategy, density=density, majority_sign_method=sign)
    theirs = _peft_factors(pm, "mix")
    mine = {key: layer.lora_factors("mix")[:2] for key, layer in adapter_layers(ours) if "mix" in layer.kind}
    assert len(mine) == len(theirs) and any("embed_tokens" in k for k in mine)
    for key, (a, b) in mine.items():
        their_a, their_b = theirs[key]
        assert torch.equal(a, their_a) and torch.equal(b, their_b), key
    ids = input_ids(batch=2, seq=8, seed=9)
    pm.set_adapter("mix")
    ac.set_adapter(ours, "mix")
    expected = logits(pm, ids)
    assert_differs(expected, logits(base, ids))
    close(logits(ours, ids), expected)


@pytest.mark.parametrize("strategy,sign", [("dare_linear", "total"), ("dare_ties", "total"),
                                           ("dare_ties", "frequency")])
def test_dare_layer_merge_equals_peft_given_the_same_random_stream(zoo, strategy, sign):
    pm, _ = _pair(zoo, ["a", "b", "c"])
    adapters, weights, density = ["a", "b", "c"], [0.9, -0.4, 0.6], 0.5
    target = pm.base_model.model.model.layers[1].self_attn.v_proj           # all three adapters target v_proj
    torch.manual_seed(1234)
    their_a, their_b = pm.base_model._generalized_task_arithmetic_weighted_adapter(
        strategy, adapters, weights, target, density, sign)
    factors = [(target.lora_A[n].weight.data, target.lora_B[n].weight.data, target.scaling[n]) for n in adapters]
    mine_a, mine_b = combine_factors(strategy, factors, weights, density, sign, torch.Generator().manual_seed(1234))
    assert torch.equal(mine_a, their_a) and torch.equal(mine_b, their_b)
    dropped = (mine_a == 0).float().mean().item()
    assert 0.05 < dropped < 0.95                 # entries were dropped at random, not all or none
    other_a, _ = combine_factors(strategy, factors, weights, density, sign, torch.Generator().manual_seed(99))
    assert not torch.equal(other_a, mine_a)       # the stream decides the drops


def test_factor_strategies_need_equal_ranks_and_a_density(zoo):
    pm, ours = _pair(zoo, ["a", "r6"])
    with pytest.raises(ValueError):
        pm.add_weighted_adapter(["a", "r6"], [0.5, 0.5], "mix", combination_type="ties", density=0.5)
    with pytest.raises(ac.AdapterError, match="same r"):
        ac.add_weighted_adapter(ours, ["a", "r6"], [0.5, 0.5], "mix", "ties", density=0.5)
    pm, ours = _pair(zoo, ["a", "b"])
    with pytest.raises(TypeError):                # PEFT compares None >= 1
        pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="ties")
    with pytest.raises(ac.AdapterError, match="density"):
        ac.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "mix", "ties")
    with pytest.raises(ac.AdapterError, match="majority_sign_method"):
        ac.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "mix", "ties", density=0.5, majority_sign_method="x")
    assert "mix" not in ours.peft_config
