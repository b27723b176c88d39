"""The direct step's kept plan (service/model/direct_plan.py): walked once while nothing changes, mixed batches
of adapters and base rows included, and walked again after each kind of change it depends on, the step then
computing what the layer modules compute (bit-identical where the direct path still applies, the general path
where it no longer does)."""

import pytest
import torch

import adapters_core as ac
from adapters_core import watched
from service.model import direct_plan, direct_step
from service.model.quant_formats import from_dense
from service.model.quant_linear import interleaved, kernel

from test_direct_step import add, both_paths, decode_step, lora, stored_model

pytestmark = pytest.mark.skipif(kernel() is None, reason="the C++ kernel cannot be built here (no compiler)")


def counting_walks(monkeypatch) -> list:
    walks = []
    real = direct_plan.build_plan

    def counting(*args):
        walks.append(1)
        return real(*args)
    monkeypatch.setattr(direct_step, "build_plan", counting)
    return walks


def test_the_plan_is_walked_once_while_nothing_changes(monkeypatch):
    model = stored_model("F32")
    add(model, "all", lora("all-linear"), 0)
    add(model, "qv", lora(["q_proj", "v_proj"]), 1)
    one, two = ac.adapter_slot(model, "all"), ac.adapter_slot(model, "qv")
    decode_step(model, [one, two, 0, one])                       # stacks made, tables built
    walks = counting_walks(monkeypatch)
    first = [decode_step(model, slots)[0] for slots in ([one, two, 0, one], [0] * 4, [two] * 4, [one, two, 0, one])]
    assert walks == [], "a step, mixed or base, changes nothing the plan depends on"
    assert torch.equal(first[0], first[3]) and not torch.equal(first[0], first[1])
    monkeypatch.setattr(direct_step, "ENABLED", False)
    general = decode_step(model, [one, two, 0, one])[0]
    assert torch.equal(general, first[0])


def _hook_attention(model):
    return model.model.layers[1].self_attn.register_forward_hook(lambda *a: None)


def _pre_hook_wrapper(model):
    return model.model.layers[0].mlp.gate_proj.register_forward_pre_hook(lambda *a: None)


def _disable(model):
    model.model.layers[1].self_attn.v_proj.disabled = True


def _ungroup(model):
    model.model.layers[0].mlp.gate_up_group = None


def _replace_projection(model):
    attn = model.model.layers[1].self_attn
    base = attn.o_proj.base_layer
    dense = torch.nn.Linear(base.in_features, base.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(base.dequantize())
    attn.o_proj.base_layer = dense


# each change: the function making it, whether the direct path still applies after it
CHANGES = {"hook on an attention module": (_hook_attention, False),
           "pre-hook on an adapter wrapper": (_pre_hook_wrapper, False),
           "adapter wrapper disabled": (_disable, False),
           "gate/up no longer grouped": (_ungroup, False),
           "a projection's base replaced": (_replace_projection, False)}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_the_direct_path_cannot_take_is_seen_at_the_next_step(change, monkeypatch):
    make, still_direct = CHANGES[change]
    model = stored_model("F32")
    add(model, "all", lora("all-linear"), 0)
    slot = ac.adapter_slot(model, "all")
    _, _, took_direct = both_paths(model, [slot, 0, slot, 0], monkeypatch)
    assert took_direct
    before = watched.generation()
    make(model)
    assert watched.generation() > before, "the change is counted"
    general, direct, took_direct = both_paths(model, [slot, 0, slot, 0], monkeypatch)
    assert took_direct is still_direct
    assert torch.equal(general[0], direct[0]) and torch.equal(general[1], direct[1])


def test_stored_data_replaced_in_place_rebuilds_the_tables(monkeypatch):
    """A stored weight's tensor swapped on the same `StoredWeight` object (as huge_pages.py moves them): the
    kept C++ tables follow it."""
    model = stored_model("F32")
    general, direct, took_direct = both_paths(model, None, monkeypatch)
    assert took_direct and torch.equal(general[0], direct[0])
    qkv = model.model.layers[0].self_attn.qkv_group
    fresh = interleaved(from_dense(torch.randn(sum(qkv.sizes), qkv.members[0].in_features), "F32"))
    qkv.stored.data = fresh.data
    walks = counting_walks(monkeypatch)
    general2, direct2, took_direct = both_paths(model, None, monkeypatch)
    assert walks and took_direct
    assert torch.equal(general2[0], direct2[0]) and not torch.equal(direct2[0], direct[0])


def test_removing_the_hook_brings_the_direct_path_back(monkeypatch):
    model = stored_model("F32")
    handle = _hook_attention(model)
    _, _, took_direct = both_paths(model, None, monkeypatch)
    assert not took_direct
    handle.remove()                      # not counted: a plan is kept only when the walk found no hook
    general, direct, took_direct = both_paths(model, None, monkeypatch)
    assert took_direct and torch.equal(general[0], direct[0])
