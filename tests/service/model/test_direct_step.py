"""The step's direct path (service/model/direct_step.py) against the general path of the decoder layers:
bit-identical hidden states and caches on stored weights (int8 and fp32 storage, q/k/v biases), bare and with
LoRA adapters mixed per token (all projections, some of them only, base rows among them), decode-only steps and
steps with prompt chunks, and the cases it must leave to the general path (IA3, DoRA, hooks, prompt chunks
without the C++ loop) taken by the general path."""

import pytest
import torch

import adapters_core as ac
from service.model import cpu_ops, direct_step
from service.model.config import ModelConfig
from service.model.decoder import Decoder, StepPlan, StepSequence
from service.model.quant_linear import QuantGroup, kernel
from service.model.quant_formats import from_dense

from _model_fixtures import random_model, tiny_qwen2_config

pytestmark = pytest.mark.skipif(kernel() is None, reason="the C++ kernel cannot be built here (no compiler)")

ROWS = 4


def stored_model(fmt: str) -> Decoder:
    config = tiny_qwen2_config(hidden_size=64, intermediate_size=128, vocab_size=512)      # q/k/v with biases
    hf = random_model(config)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    stored = {k: from_dense(state.pop(k), fmt) for k in list(state) if k.endswith("_proj.weight")}
    return Decoder.from_state_dict(ModelConfig.from_hf_dict(config.to_dict()), state, max_positions=64, stored=stored)


def lora(targets, **extra) -> ac.LoraConfig:
    return ac.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)


def add(model, name, config, seed):
    torch.manual_seed(seed)
    ac.inject_adapter_in_model(config, model, adapter_name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}" in n:
                p.copy_(torch.randn_like(p) * 0.2)


# A mixed step: decode rows beside a first prompt chunk and a later one (cache slot, first position, length).
MIXED = [(0, 5, 1), (1, 0, 3), (2, 7, 1), (3, 4, 2)]


def decode_step(model, slots, start=5, calls=None, scales=None, seqs=None):
    """Hidden states of one step and the cache it wrote: by default ROWS decoding sequences (each with `start`
    earlier cache positions); `seqs` (slot, start, length) per sequence for other steps. `slots` and `scales`
    are per sequence."""
    c = model.config
    cache = type("Cache", (), {})()
    torch.manual_seed(1)
    cache.k = torch.randn(c.num_hidden_layers, ROWS, c.num_key_value_heads, 16, c.head_dim)
    cache.v = torch.randn_like(cache.k)
    seqs = seqs or [(r, start + r, 1) for r in range(ROWS)]
    lengths = [n for _, _, n in seqs]
    ends = torch.tensor(lengths).cumsum(0) - 1
    plan = StepPlan([StepSequence(*seq) for seq in seqs], ends)
    tokens = torch.arange(3, 3 + sum(lengths))
    positions = torch.tensor([p for _, first, n in seqs for p in range(first, first + n)])
    if slots is not None:
        slots = [slot for slot, n in zip(slots, lengths) for _ in range(n)]
    if scales is not None:
        scales = [scale for scale, n in zip(scales, lengths) for _ in range(n)]
    with torch.inference_mode():
        if getattr(model, "peft_config", None):
            with ac.token_batch(model, torch.tensor(slots), scales=scales):
                return model.forward_step(tokens, positions, plan, cache), cache.k.clone()
        return model.forward_step(tokens, positions, plan, cache), cache.k.clone()


def both_paths(model, slots, monkeypatch, scales=None, seqs=None):
    """(general, direct) results of the same step, and whether the step took the direct path."""
    taken = []
    real = direct_step.direct_decode

    def counting(*args):
        out = real(*args)
        taken.append(out is not None)
        return out
    monkeypatch.setattr("service.model.decoder.direct_decode", counting)
    monkeypatch.setattr(direct_step, "ENABLED", False)
    general = decode_step(model, slots, scales=scales, seqs=seqs)
    monkeypatch.setattr(direct_step, "ENABLED", True)
    direct = decode_step(model, slots, scales=scales, seqs=seqs)
    return general, direct, taken[-1]


@pytest.mark.parametrize("fmt", ["I8", "F32"])
def test_bare_stored_model_is_bit_identical(fmt, monkeypatch):
    """Without LoRA deltas the whole loop is one C++ call (csrc/decode_layers.cpp); without that table, the
    same kernels from Python: both bit-identical to the layer modules."""
    model = stored_model(fmt)
    assert isinstance(model.model.layers[0].self_attn.qkv_group, QuantGroup)
    native = []
    real = direct_step._native_tables
    monkeypatch.setattr(direct_step, "_native_tables", lambda *a: native.append(real(*a)) or native[-1])
    general, direct, took_direct = both_paths(model, None, monkeypatch)
    assert took_direct and native[-1] is not None
    assert torch.equal(general[0], direct[0]) and torch.equal(general[1], direct[1])   # outputs and cache writes
    monkeypatch.setattr(direct_step, "_native_tables", lambda *a: None)
    _, from_python, took_direct = both_paths(model, None, monkeypatch)
    assert took_direct and torch.equal(from_python[0], direct[0]) and torch.equal(from_python[1], direct[1])


@pytest.mark.parametrize("scales", [None, [0.5, 1.0, 2.0, 0.25]])
def test_mixed_lora_adapters_are_bit_identical(scales, monkeypatch):
    """LoRA deltas of adapters of different targets and dtypes (one fp32, one bf16), mixed per token with base
    rows, with and without per-token adapter scales: the C++ loop (deltas added by adapters_core's fused kernel
    from inside it), the same kernels called from Python, and the layer modules give the same bits."""
    model = stored_model("I8")
    add(model, "all", lora("all-linear"), 0)
    add(model, "qv", lora(["q_proj", "v_proj", "down_proj"]), 1)
    with torch.no_grad():                              # "qv" held in bf16, as an adapter saved in bf16 is
        for name, p in model.named_parameters():
            if ".qv." in name:
                p.data = p.data.to(torch.bfloat16)
    all_slot, qv_slot = ac.adapter_slot(model, "all"), ac.adapter_slot(model, "qv")
    native = []
    real = direct_step._native_lora
    monkeypatch.setattr(direct_step, "_native_lora", lambda *a: native.append(real(*a)) or native[-1])
    for slots in ([all_slot, 0, qv_slot, all_slot], [0, 0, 0, 0], [qv_slot] * ROWS):
        general, direct, took_direct = both_paths(model, slots, monkeypatch, scales)
        assert took_direct and native[-1] is not None and (native[-1][0] != 0) == (slots != [0] * ROWS)
        assert torch.equal(general[0], direct[0]) and torch.equal(general[1], direct[1])
        monkeypatch.setattr(direct_step, "_native_lora", lambda *a: None)
        _, from_python, took_direct = both_paths(model, slots, monkeypatch, scales)
        assert took_direct and torch.equal(from_python[0], direct[0])
        monkeypatch.setattr(direct_step, "_native_lora", lambda *a: native.append(real(*a)) or native[-1])
    dtypes = model.model.layers[0].self_attn.q_proj.stack.table[:, 4]          # the slot table's dtype codes
    assert set(dtypes[[all_slot, qv_slot]].tolist()) == {0, 1}, "one fp32 and one bf16 adapter"
    base = decode_step(model, [0] * ROWS)[0]
    assert not torch.equal(base, decode_step(model, [all_slot] * ROWS)[0]), "the adapters change the output"
    scaled = decode_step(model, [all_slot] * ROWS, scales=[0.5] * ROWS)[0]
    assert not torch.equal(scaled, decode_step(model, [all_slot] * ROWS)[0]), "the scales change the output"


@pytest.mark.parametrize("kind", ["ia3", "dora", "modules_to_save"])
def test_adapters_the_direct_path_does_not_compute_take_the_general_path(kind, monkeypatch):
    model = stored_model("F32")
    config = {"ia3": lambda: ac.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                          init_ia3_weights=False),
              "dora": lambda: lora(["q_proj", "o_proj"], use_dora=True),
              "modules_to_save": lambda: lora(["q_proj"], modules_to_save=["post_attention_layernorm"])}[kind]()
    add(model, "x", config, 2)
    slot = ac.adapter_slot(model, "x")
    general, direct, took_direct = both_paths(model, [slot, 0, slot, 0], monkeypatch)
    assert not took_direct
    assert torch.equal(general[0], direct[0])
    _, _, took_direct = both_paths(model, [0] * ROWS, monkeypatch)
    if kind == "modules_to_save":            # the norm stays wrapped: the layer modules route every step
        assert not took_direct
    else:
        assert took_direct, "a step whose rows are all on the base model does not use the adapter"


def test_prefill_steps_without_the_cpp_loop_and_hooks_take_the_general_path(monkeypatch):
    model = stored_model("F32")
    cache = type("Cache", (), {})()
    c = model.config
    cache.k = torch.zeros(c.num_hidden_layers, 1, c.num_key_value_heads, 16, c.head_dim)
    cache.v = torch.zeros_like(cache.k)
    plan = StepPlan([StepSequence(0, 0, 3)], torch.tensor([2]))
    with torch.inference_mode(), monkeypatch.context() as patch:
        patch.setattr(direct_step, "_native_tables", lambda *a: None)
        assert direct_step.direct_decode(model, torch.zeros(3, c.hidden_size), model.rope().at(torch.arange(3)),
                                         plan, cache) is None
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: None)
    try:
        _, _, took_direct = both_paths(model, None, monkeypatch)
        assert not took_direct
    finally:
        handle.remove()
    _, _, took_direct = both_paths(model, None, monkeypatch)
    assert took_direct


@pytest.mark.parametrize("fmt", ["I8", "F32"])
def test_mixed_steps_with_prompt_chunks_are_bit_identical(fmt, monkeypatch):
    """Decode rows beside prompt chunks (a first chunk and a later one, whose queries see the cached keys
    before them), bare and with LoRA adapters per sequence: the C++ loop writes the chunks' keys and values
    and attends as the layer modules do, to the bit (outputs and cache); without the C++ loop such a step
    is left to the layer modules."""
    model = stored_model(fmt)
    general, direct, took_direct = both_paths(model, None, monkeypatch, seqs=MIXED)
    assert took_direct
    assert torch.equal(general[0], direct[0]) and torch.equal(general[1], direct[1])
    for seqs in ([(1, 0, 3)], [(3, 4, 2), (0, 9, 1)]):                          # prompt chunks only, and one later
        general, direct, took_direct = both_paths(model, None, monkeypatch, seqs=seqs)
        assert took_direct and torch.equal(general[0], direct[0]) and torch.equal(general[1], direct[1])
    add(model, "all", lora("all-linear"), 0)
    add(model, "qv", lora(["q_proj", "v_proj", "down_proj"]), 1)
    per_seq = [ac.adapter_slot(model, "all"), ac.adapter_slot(model, "qv"), 0, ac.adapter_slot(model, "all")]
    general, direct, took_direct = both_paths(model, per_seq, monkeypatch, scales=[1.0, 0.5, 1.0, 2.0], seqs=MIXED)
    assert took_direct
    assert torch.equal(general[0], direct[0]) and torch.equal(general[1], direct[1])
    base = decode_step(model, [0] * 4, seqs=MIXED)[0]
    assert not torch.equal(base, direct[0]), "the adapters change the output"
    monkeypatch.setattr(direct_step, "_native_tables", lambda *a: None)
    _, _, took_direct = both_paths(model, per_seq, monkeypatch, seqs=MIXED)
    assert not took_direct


def test_the_step_gate_is_open_only_around_the_cpp_loop(monkeypatch):
    """Inside a step (the gate held), the one C++ call of the loop runs with the gate opened, so another
    thread (the registry's evictor) gets in during it, and not before or after; the result is unchanged."""
    import threading

    from service.engine.step_gate import StepGate
    from service.model import cpu_ops

    model = stored_model("I8")
    add(model, "all", lora("all-linear"), 0)
    slots = [ac.adapter_slot(model, "all")] * ROWS
    want = decode_step(model, slots)
    model.step_gate = gate = StepGate()
    ops = cpu_ops.kernel()
    real = ops.decode_layers
    entered = []

    def other_thread_enters() -> bool:
        got = []
        t = threading.Thread(target=lambda: got.append(gate._lock.acquire(timeout=0.2) and gate._lock.release()
                                                       is None))
        t.start()
        t.join()
        return bool(got and got[0])

    def watched(*args):
        entered.append(other_thread_enters())
        return real(*args)
    monkeypatch.setattr(ops, "decode_layers", watched)
    with gate.step():
        assert not other_thread_enters()
        got = decode_step(model, slots)
        assert not other_thread_enters()
    assert entered == [True]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("fmt", ["F32", "BF16"])
def test_reading_the_next_weight_ahead_changes_no_bit(fmt, monkeypatch):
    """From the engine's kind of thread (on the process's first thread nothing is read ahead: its matmuls go to
    OpenMP's team), the C++ loop with the matmul pool's workers reading each next interleaved weight ahead gives
    the same bits as without, with and without LoRA deltas."""
    import threading

    model = stored_model(fmt)
    assert model.model.layers[0].self_attn.qkv_group.stored.kernel_id in (12, 13)      # interleaved F32 / BF16
    add(model, "one", lora(["q_proj", "v_proj", "o_proj", "down_proj"]), seed=1)
    slot = ac.adapter_slot(model, "one")
    qm = kernel()
    entries = []
    real_entry = qm.quant_read_ahead_entry
    monkeypatch.setattr(qm, "quant_read_ahead_entry", lambda: entries.append(real_entry()) or entries[-1])
    results = {}

    def steps():
        for ahead in (False, True):
            monkeypatch.setattr(direct_step, "READ_AHEAD", ahead)
            results[ahead] = [decode_step(model, slots) for slots in ([0] * ROWS, [slot, 0, slot, slot])]

    thread = threading.Thread(target=steps)
    thread.start()
    thread.join(120)
    assert set(results) == {False, True} and len(entries) == 2 and entries[0] != 0, "read ahead in both steps"
    for (out, cache), (out2, cache2) in zip(results[False], results[True]):
        assert torch.equal(out, out2) and torch.equal(cache, cache2)
    assert not torch.equal(results[True][0][0], results[True][1][0]), "the adapter changes the output"


@pytest.mark.parametrize("fmt", ["F32", "BF16", "I8"])
def test_where_the_lora_deltas_are_computed_changes_no_bit(fmt, monkeypatch):
    """The C++ loop computes each matmul's LoRA deltas on its threads beside it (direct_step.LORA_BESIDE), or
    after it, handing the matmul the factors (each adapter of the step once) for its threads to pull into the
    cache (direct_step.FACTORS_ALONGSIDE), or neither: from the engine's kind of thread, the same bits every
    way, for adapters of two ranks and dtypes side by side with base rows, decode rows alone and beside prompt
    chunks, on interleaved weights (which take the spans) and int8 ones (which ignore them and take the deltas
    before the matmul)."""
    import threading

    model = stored_model(fmt)
    add(model, "one", lora(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), seed=1)
    config = ac.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "up_proj", "down_proj"],
                           init_lora_weights=False)
    torch.manual_seed(2)
    state = {k: torch.randn(v.shape) * 0.2 for k, v in ac.get_peft_model_state_dict(model, adapter_name="one").items()
             if any(p in k for p in config.target_modules)}
    state = {k: v[:2] if "lora_A" in k else v[:, :2] for k, v in state.items()}          # rank 2
    ac.load_adapter(model, "unused", adapter_name="two", config=config, state_dict=state,
                    factor_dtype=torch.bfloat16)                                         # held in bf16
    assert model.model.layers[0].self_attn.q_proj.lora_A["two"].weight.dtype == torch.bfloat16
    one, two = ac.adapter_slot(model, "one"), ac.adapter_slot(model, "two")
    ops, flags = cpu_ops.kernel(), []
    real_loop = ops.decode_layers
    monkeypatch.setattr(ops, "decode_layers", lambda *args: flags.append((args[3], args[-1] != 0)) or real_loop(*args))
    modes = [(False, False), (False, True), (True, True)]                 # (LORA_BESIDE, FACTORS_ALONGSIDE)
    results = {}

    def steps():
        for beside, alongside in modes:
            monkeypatch.setattr(direct_step, "LORA_BESIDE", beside)
            monkeypatch.setattr(direct_step, "FACTORS_ALONGSIDE", alongside)
            results[beside, alongside] = [decode_step(model, slots) for slots in ([one, two, 0, one], [two] * ROWS)]
            results[beside, alongside].append(decode_step(model, [one, two, 0, two], seqs=MIXED))

    thread = threading.Thread(target=steps)
    thread.start()
    thread.join(120)
    assert list(results) == modes and flags == [(a, b) for b, a in modes for _ in range(3)], "the C++ loop, told"
    for mode in modes[1:]:
        for (out, cache), (out2, cache2) in zip(results[modes[0]], results[mode]):
            assert torch.equal(out, out2) and torch.equal(cache, cache2)
    assert not torch.equal(results[modes[0]][0][0], results[modes[0]][1][0]), "the adapters change the output"


def test_the_loops_kept_tables_follow_a_replaced_weight(monkeypatch):
    """The C++ loop's tables are kept on the model between steps (`_native_tables`): a norm weight or a
    projection's stored weight replaced afterwards is what the next step computes with, as the layers do."""
    from service.model.quant_linear import interleaved

    model = stored_model("F32")
    general, direct, took_direct = both_paths(model, None, monkeypatch)
    assert took_direct and torch.equal(general[0], direct[0])
    layer = model.model.layers[1]
    norm, down = layer.post_attention_layernorm, layer.mlp.down_proj
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 1.5, requires_grad=False)
    down.stored = interleaved(from_dense(torch.randn(down.out_features, down.in_features), "F32"))
    general2, direct2, took_direct = both_paths(model, None, monkeypatch)
    assert took_direct and torch.equal(general2[0], direct2[0]) and torch.equal(general2[1], direct2[1])
    assert not torch.equal(direct2[0], direct[0]), "the new weights change the output"
