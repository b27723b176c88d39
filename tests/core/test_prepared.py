"""`prepare_adapter` + `attach_prepared` (a server's off-thread LoRA load) leave the model exactly as
`load_adapter` does for the same adapter: same outputs in a mixed batch, same PEFT state dict, the adapter
inactive and frozen; and they step aside (None / False, model unchanged) for what they do not cover."""
import pytest
import torch

import adapters_core as ac
from adapters_core.packing import pack_adapter_tensors
from adapters_core.management import cast_adapter_factors
from adapters_core.model_tree import slot_table
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


def _assert_same_batch(model, other, x, names) -> None:
    """Both models compute the same bits for a mixed batch of `names` (one adapter name per row)."""
    with torch.no_grad(), ac.token_batch(model, names):
        got = model(x)
    with torch.no_grad(), ac.token_batch(other, names):
        want = other(x)
    assert torch.equal(got, want)


def test_attached_adapter_equals_a_full_load():
    config2 = _config(6, use_rslora=True)
    attached, loaded = _both(_state(4, 0), _state(6, 1), config2)
    _assert_same_batch(attached, loaded, torch.randn(5, 16), ["second", "first", "__base__", "second", "first"])
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


def test_first_write_holds_the_prepared_rows_and_equals_deriving_them():
    """The slot rows computed while preparing (`lora_slot_rows`) are what the first sync writes, and equal what
    the stack derives from the attached layers itself; a change through adapters_core (a dtype cast) drops
    them, so the next write derives rows of the new tensors."""
    model = _model()
    ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=dict(_state(4, 0)),
                    low_cpu_mem_usage=True)
    prepared = prepare_adapter(model, _config(6), pack_adapter_tensors(_state(6, 1)), "second")
    assert attach_prepared(model, prepared)
    table = slot_table(model)
    slot = ac.adapter_slot(model, "second")
    table.sync(["second"], check_edits=False)
    written = [(layer.stack.lora[slot], layer.stack.table[slot].clone()) for layer in table.layers["second"]]
    for (held, row), rows in zip(written, prepared.rows):
        assert all(a is b for a, b in zip(held, rows[:3])) and row.tolist() == list(rows[3])
    table.invalidate("second")
    table.sync(["second"], check_edits=False)                          # derived from the layers this time
    for (held, row), layer in zip(written, table.layers["second"]):
        again = layer.stack.lora[slot]
        assert all(torch.equal(a, b) for a, b in zip(held, again))              # A, Bt and the scale
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(held[:2], again[:2]))   # the same storage
        derived = layer.stack.table[slot].tolist()
        assert derived[:2] + derived[3:] == row.tolist()[:2] + row.tolist()[3:]   # (column 2: the scale's address)
    cast_adapter_factors(model, "second", torch.bfloat16)
    table.sync(["second"], check_edits=False)
    layer = table.layers["second"][0]
    assert layer.stack.lora[slot][0].dtype == torch.bfloat16
    assert int(layer.stack.table[slot][0]) == layer.stack.lora[slot][0].data_ptr()


def test_linear_holding_builds_what_nn_linear_would():
    """`linear_holding` fills a module's state directly: an nn.Linear (printed as one) with the same attributes
    and container types, the hook containers made on first use (4 objects for the garbage collector instead of
    15), each module's containers its own (a hook on one module is not on another), the given tensors as
    parameters; pickled and restored like any module."""
    import gc
    import io

    from adapters_core.layer import linear_holding

    weight, bias = torch.randn(3, 5), torch.randn(3)
    lin, other = linear_holding(weight, bias, requires_grad=False), linear_holding(weight)
    ref = torch.nn.Linear(5, 3)
    assert isinstance(lin, torch.nn.Linear) and repr(lin) == repr(ref)
    def tracked_per_module(make) -> float:
        gc.collect()
        before = len(gc.get_objects())
        made = [make() for _ in range(100)]
        return (len(gc.get_objects()) - before - 1) / len(made)
    held = tracked_per_module(lambda: linear_holding(weight, requires_grad=False))
    plain = tracked_per_module(lambda: torch.nn.Linear(5, 3, bias=False))
    assert held < 5.5 and plain > 13, (held, plain)      # ~4 against ~15 (other allocations may add a few)
    assert [(k, type(getattr(lin, k))) for k in vars(ref)] == [(k, type(v)) for k, v in vars(ref).items()]
    assert all(getattr(lin, k) is not getattr(other, k) for k, v in vars(ref).items() if isinstance(v, (dict, set)))
    buffer = io.BytesIO()
    torch.save(linear_holding(weight, bias), buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert torch.equal(restored.weight, weight)
    assert [(k, type(getattr(restored, k))) for k in vars(ref)] == [(k, type(v)) for k, v in vars(ref).items()]
    assert lin.weight.data_ptr() == weight.data_ptr() and not lin.weight.requires_grad and other.bias is None
    assert (lin.in_features, lin.out_features) == (5, 3) and other.weight.requires_grad
    lin.register_forward_hook(lambda *a: None)
    assert len(lin._forward_hooks) == 1 and len(other._forward_hooks) == 0
    x = torch.randn(2, 5)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, weight, bias))
    assert list(lin.state_dict()) == ["weight", "bias"]


def test_a_copied_model_writes_its_own_tables():
    """The stacks write table rows through a numpy view taken at each write: a deep-copied model's deletes
    and writes reach its own tables, never the original's."""
    import copy

    model = _model()
    ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=dict(_state(4, 0)),
                    low_cpu_mem_usage=True)
    slot_table(model).sync(["first"], check_edits=False)
    twin = copy.deepcopy(model)
    slot = ac.adapter_slot(model, "first")
    ac.delete_adapter(twin, "first")
    assert model.q_proj.stack.table[slot].abs().sum() > 0 and twin.q_proj.stack.table[slot].abs().sum() == 0
    row = model.q_proj.stack.table[slot].tolist()
    assert row[0] == model.q_proj.lora_A["first"].weight.data_ptr()


def test_paths_are_looked_up_as_a_walk_finds_them():
    """Layers are found by their dotted paths: a key that names a module inside an adapter wrapper, or a layer
    the state dict reaches twice (a module shared under two names), steps aside to the general path; layers
    of one rank and scaling share their (read-only) fp32 scale rows, holding the same values as their own."""
    model = _model()
    ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=dict(_state(4, 0)),
                    low_cpu_mem_usage=True)
    state = _state(4, 1)
    inner = {k.replace("q_proj.", "q_proj.base_layer."): v for k, v in state.items()}
    assert prepare_adapter(model, _config(4), inner, "a") is None                # inside the q_proj wrapper
    model.add_module("q_again", model.q_proj)                                    # one layer, two names
    twice = dict(state, **{k.replace("q_proj", "q_again"): v for k, v in state.items() if "q_proj" in k})
    assert prepare_adapter(model, _config(4), twice, "a") is None
    del model.q_again
    config = ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    same_rank = {"base_model.model.q_proj.lora_A.weight": torch.randn(4, 16),
                 "base_model.model.q_proj.lora_B.weight": torch.randn(24, 4),
                 "base_model.model.v_proj.lora_A.weight": torch.randn(4, 24),
                 "base_model.model.v_proj.lora_B.weight": torch.randn(8, 4)}
    prepared = prepare_adapter(model, config, pack_adapter_tensors(same_rank), "b")
    (_, _, q_scale, _), (_, _, v_scale, _) = prepared.rows
    assert q_scale is v_scale and torch.equal(q_scale, torch.full((4,), 2.0))
    different = prepare_adapter(model, _config(4), pack_adapter_tensors(_state(4, 2)), "c")   # v: rank 6
    assert different.rows[0][2] is not different.rows[1][2]
    assert torch.equal(different.rows[1][2], torch.full((6,), 12 / 6))


def test_plain_factors_share_storage_and_lay_b_out_as_bt():
    """`stack.plain_factors`: plain tensors (a Parameter's own tensor), A contiguous, B [out, r] whose storage
    is Bt [r, out]: a B already laid out so (a packed or mapped adapter's) is shared, not copied; a B laid
    out as [out, r] is copied once into that layout, with the same values."""
    from adapters_core.stack import plain_factors

    a = torch.nn.Parameter(torch.randn(4, 8), requires_grad=False)
    stored_bt = torch.randn(4, 16)
    got_a, got_b, bt = plain_factors(a, stored_bt.T)
    assert type(got_a) is torch.Tensor and got_a.data_ptr() == a.data_ptr() and got_a.is_contiguous()
    assert bt.data_ptr() == stored_bt.data_ptr() and bt.is_contiguous() and torch.equal(got_b, stored_bt.T)
    dense_b = torch.randn(16, 4)
    _, got_b, bt = plain_factors(torch.randn(4, 8), dense_b)
    assert bt.is_contiguous() and got_b.data_ptr() == bt.data_ptr() != dense_b.data_ptr()
    assert torch.equal(got_b, dense_b) and torch.equal(bt, dense_b.T)
    grad_a = torch.randn(4, 8, requires_grad=True)
    assert not plain_factors(grad_a, stored_bt.T)[0].requires_grad


def test_attach_writes_what_the_module_dicts_would_and_refuses_what_add_module_refuses():
    """The entries go straight into the ModuleDicts (no per-entry `add_module`): the same modules, names and
    parameters as a full load, dropout included; a name `add_module` refuses (an attribute of ModuleDict, which
    a full load refuses half-way with a KeyError) is refused before anything changes."""
    config2 = _config(6, lora_dropout=0.1)
    attached, loaded = _both(_state(4, 0), _state(6, 1), config2)
    for layer in ("q_proj", "v_proj"):
        for holder in ("lora_A", "lora_B", "lora_dropout"):
            got, want = getattr(attached, layer)._modules[holder], getattr(loaded, layer)._modules[holder]
            assert list(got.keys()) == list(want.keys()) == ["first", "second"]
            assert type(got["second"]) is type(want["second"])
    assert isinstance(attached.q_proj.lora_dropout["second"], torch.nn.Dropout)
    assert [n for n, _ in attached.named_parameters()] == [n for n, _ in loaded.named_parameters()]
    model = _model()
    ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=_state(4, 0),
                    low_cpu_mem_usage=True)
    before = [n for n, _ in model.named_modules()]
    prepared = prepare_adapter(model, _config(6), pack_adapter_tensors(_state(6, 1)), "items")
    with pytest.raises(ac.AdapterError, match="'items' is an attribute of torch's ModuleDict"):
        attach_prepared(model, prepared)
    with pytest.raises(KeyError, match="attribute 'items' already exists"):
        ac.load_adapter(_model(), "x", adapter_name="items", config=_config(6), state_dict=_state(6, 1),
                        low_cpu_mem_usage=True)
    assert [n for n, _ in model.named_modules()] == before
    assert "items" not in model.q_proj.kind and "items" not in model.peft_config


def test_layers_wrapped_ahead_serve_the_base_and_take_a_first_load_prepared():
    """`wrap_target_layers` (a server's start: the layers its stored adapters target) wraps them holding no
    adapter: the model computes what it did, bit for bit; the first adapter on them is then prepared and
    attached, and equals a full load on a model never wrapped ahead."""
    model, x = _model(), torch.randn(5, 16)
    with torch.no_grad():
        before = model(x)
    assert ac.wrap_target_layers(model, _config(4)) == 2
    assert ac.wrap_target_layers(model, _config(8)) == 0                       # already wrapped: nothing to do
    assert type(model.q_proj) is ac.AdapterLayer and type(model.v_proj) is ac.AdapterLayer
    assert ac.active_adapters(model) == [] and not getattr(model, "peft_config", {})    # no adapter added
    with torch.no_grad():
        assert torch.equal(model(x), before)
    second = _state(6, 1)
    prepared = prepare_adapter(model, _config(6), pack_adapter_tensors(second), "second")
    assert prepared is not None and attach_prepared(model, prepared)
    loaded = _model()
    ac.load_adapter(loaded, "x", adapter_name="second", config=_config(6), state_dict=dict(second),
                    low_cpu_mem_usage=True)
    ac.set_adapter(loaded, [])
    _assert_same_batch(model, loaded, x, ["second", "__base__", "second", "__base__", "second"])
    with torch.no_grad():
        assert torch.equal(model(x), before)                                   # attached inactive


def test_wrapping_ahead_leaves_embeddings_prompts_and_unmatched_targets_to_the_loads():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("embed_tokens", torch.nn.Embedding(10, 16))
    model.add_module("q_proj", torch.nn.Linear(16, 16))
    config = ac.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    assert ac.wrap_target_layers(model, config) == 1
    assert type(model.embed_tokens) is torch.nn.Embedding and type(model.q_proj) is ac.AdapterLayer
    assert ac.wrap_target_layers(model, ac.LoraConfig(r=4, target_modules=["nothing_here"])) == 0
    assert ac.wrap_target_layers(model, ac.PromptTuningConfig(num_virtual_tokens=4)) == 0
    assert [type(m).__name__ for m in model] == ["Embedding", "AdapterLayer"]
    with pytest.raises(ac.AdapterError, match="no default for this model type"):
        ac.wrap_target_layers(model, ac.LoraConfig(r=4))                       # no targets, no model type


def test_scale_rows_are_shared_across_adapters_and_preparing_keeps_the_gil():
    """Layers of one rank, scaling and device share one read-only fp32 scale tensor across adapters too (the
    process keeps them: `torch.full` lets the GIL go, and a loader beside a busy event loop then waited up to
    the 5 ms switch interval), made as ordinary tensors even inside inference mode; preparing a packed adapter
    whose scale rows exist never lets the GIL go."""
    from gil_check import lets_the_gil_go
    model = _model()
    ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=dict(_state(4, 0)),
                    low_cpu_mem_usage=True)
    one = prepare_adapter(model, _config(4), pack_adapter_tensors(_state(4, 1)), "one")
    two = prepare_adapter(model, _config(4), pack_adapter_tensors(_state(4, 2)), "two")
    assert torch.equal(one.rows[0][2], torch.full((4,), 3.0)) and torch.equal(one.rows[1][2], torch.full((6,), 2.0))
    assert all(a[2] is b[2] for a, b in zip(one.rows, two.rows))                   # one tensor each
    state, kept = pack_adapter_tensors(_state(4, 3)), []
    assert not lets_the_gil_go(lambda: kept.append(prepare_adapter(model, _config(4), state, "three")))
    assert kept[-1] is not None and attach_prepared(model, kept[-1])
    from adapters_core.stack import lora_scale_rows
    with torch.inference_mode():                    # (a step's first write of a slot may run in inference mode)
        rows = lora_scale_rows(5, 0.25, torch.device("cpu"))
    assert not rows.is_inference() and lora_scale_rows(5, 0.25, torch.device("cpu")) is rows


def test_layouts_are_kept_per_key_list_and_dropped_when_a_module_is_swapped():
    """The layers a key list names are looked up once per tree (`_layout`, kept in the slot table): adapters of
    the same keys share one layout, and still have their shapes checked against their own config; swapping a
    module in (any wrap or unwrap goes through `set_submodule`) drops the kept layouts, so the next adapter is
    prepared on the layer the model now holds, not on the one it held."""
    from adapters_core.injection import wrap_target_layers
    from adapters_core.model_tree import set_submodule
    model = _model()
    ac.load_adapter(model, "x", adapter_name="first", config=_config(4), state_dict=dict(_state(4, 0)),
                    low_cpu_mem_usage=True)
    table = slot_table(model)
    one = prepare_adapter(model, _config(4), pack_adapter_tensors(_state(4, 1)), "one")
    two = prepare_adapter(model, _config(4), pack_adapter_tensors(_state(4, 2)), "two")
    assert len(table.layouts) == 1 and [l[0] for l in one.layers] == [l[0] for l in two.layers]
    with pytest.raises(ac.AdapterWeightsError, match="q_proj"):
        prepare_adapter(model, _config(5), pack_adapter_tensors(_state(4, 3)), "bad")   # the same keys
    old_q = model.q_proj
    set_submodule(model, "q_proj", old_q.base_layer)                   # unwrapped (as a failed load undoes it)
    assert table.layouts == {}
    assert prepare_adapter(model, _config(4), pack_adapter_tensors(_state(4, 4)), "three") is None
    assert wrap_target_layers(model, _config(4)) == 1                    # a new wrapper on q_proj
    three = prepare_adapter(model, _config(4), pack_adapter_tensors(_state(4, 4)), "three")
    assert three.layers[0][0] is model.q_proj and model.q_proj is not old_q
    assert attach_prepared(model, three)
    four = prepare_adapter(model, _config(4), pack_adapter_tensors(_state(4, 5)), "four")
    assert len(table.layouts) == 1
    table.modules = [m for m in table.modules if m is not model.v_proj]   # gone meanwhile (another thread)
    assert attach_prepared(model, four) is False and table.layouts == {}


def test_rows_made_unchecked_equal_the_fully_checked_ones():
    """`table_row(..., checked=True)` (the prepared path's factors, made contiguous on the CPU) gives the row the
    full checks give, and None for a dtype the kernel does not read."""
    from adapters_core import sgmv
    from adapters_core.stack import lora_scale_rows, plain_factors
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        a, b, bt = plain_factors(torch.randn(5, 12).to(dtype), torch.randn(7, 5).to(dtype))
        scale = lora_scale_rows(5, 0.5, a.device)
        assert sgmv.table_row(a, bt, scale, checked=True) == sgmv.table_row(a, bt, scale)
    assert sgmv.table_row(a, bt, scale, checked=True) is None                         # (float64)
