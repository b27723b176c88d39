"""`prepare_adapter` + `attach_prepared` (a server's off-thread LoRA load) leave the model exactly as
`load_adapter` does for the same adapter: same outputs in a mixed batch, same PEFT state dict, the adapter
inactive and frozen; and they step aside (None / False, model unchanged) for what they do not cover."""
import torch

import adapters_core as ac
from adapters_core.packing import pack_adapter_tensors
from adapters_core.prepared import attach_prepared, prepare_adapter


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(16, 24))
    model.add_module("act", torch.nn.Tanh())
    model.add_module("v_proj", torch.nn.Linear(24, 8))
    return model.eval()


def _state(r, seed, out=24, mid=24):
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.q_proj.lora_A.weight": torch.randn(r, 16, generator=g),
            "base_model.model.q_proj.lora_B.weight": torch.randn(out, r, generator=g),
            "base_model.model.v_proj.lora_A.weight": torch.randn(r + 2, mid, generator=g),
            "base_model.model.v_proj.lora_B.weight": torch.randn(8, r + 2, generator=g)}


def _config(r, **kw):
    return ac.LoraConfig(r=r, lora_alpha=3 * r, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"v_proj": r + 2}, **kw)


def _both(first_state, second_state, config2):
    """(model with `second` attached from a worker's preparation, model with it loaded in full)."""
    models = []
    for prepared_path in (True, False):
        model = _model()
        ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=dict(first_state),
                        low_cpu_mem_usage=True)
        ac.set_adapter(model, [])
        if prepared_path:
            prepared = prepare_adapter(model, config2, pack_adapter_tensors(second_state), "second")
            assert prepared is not None and attach_prepared(model, prepared)
        else:
            ac.load_adapter(model, "x", adapter_name="second", config=config2, state_dict=dict(second_state),
                            low_cpu_mem_usage=True)
            ac.set_adapter(model, [])
        models.append(model)
    return models


def test_attached_adapter_equals_a_full_load():
    config2 = _config(6, use_rslora=True)
    attached, loaded = _both(_state(4, 0), _state(6, 1), config2)
    x = torch.randn(5, 16)
    names = ["second", "first", "__base__", "second", "first"]
    with torch.no_grad(), ac.token_batch(attached, names):
        got = attached(x)
    with torch.no_grad(), ac.token_batch(loaded, names):
        want = loaded(x)
    assert torch.equal(got, want)
    a = ac.get_peft_model_state_dict(attached, adapter_name="second")
    b = ac.get_peft_model_state_dict(loaded, adapter_name="second")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ac.active_adapters(attached) == [] and attached.q_proj.active_adapters == []
    assert not any(p.requires_grad for n, p in attached.named_parameters() if "second" in n)
    assert attached.v_proj.scaling["second"] == loaded.v_proj.scaling["second"]
    assert attached.peft_config["second"].r == 6


def test_not_covered_or_changed_tree_steps_aside():
    model = _model()
    state = _state(4, 0)
    assert prepare_adapter(model, _config(4), state, "a") is None             # targets not wrapped yet
    ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=dict(state),
                    low_cpu_mem_usage=True)
    assert prepare_adapter(model, _config(4, use_dora=True), state, "a") is None
    assert prepare_adapter(model, ac.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), state, "a") is None
    bias_state = dict(state, **{"base_model.model.q_proj.lora_B.bias": torch.zeros(24)})
    assert prepare_adapter(model, _config(4), bias_state, "a") is None
    prepared = prepare_adapter(model, _config(4), state, "a")
    fresh = _model()                                                           # its layers are not in this model
    ac.load_adapter(fresh, "x", adapter_name="first", config=_config(4), state_dict=dict(state),
                    low_cpu_mem_usage=True)
    keys = set(fresh.state_dict())
    assert attach_prepared(fresh, prepared) is False and set(fresh.state_dict()) == keys
    assert "a" not in fresh.peft_config


def test_bad_shapes_are_refused():
    model = _model()
    ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=dict(_state(4, 0)),
                    low_cpu_mem_usage=True)
    try:
        prepare_adapter(model, _config(5), _state(4, 1), "a")                 # rank 5 config, rank 4 tensors
    except ac.AdapterWeightsError as exc:
        assert "q_proj" in str(exc)
    else:
        raise AssertionError("shapes that do not fit were accepted")
