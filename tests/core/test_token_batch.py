"""token_batch: a flattened token batch with one adapter per token equals running each adapter alone.

The model is per-token (no attention), so a token's output depends only on its id and its adapter; that
lets a flattened batch mixing prefill-like runs and single decode tokens be checked token by token.
"""

import pytest
import torch

import adapters_core as ac
from adapters_core.stack import BatchMapping
from _models import PerTokenModel


def _model():
    torch.manual_seed(0)
    model = PerTokenModel()
    configs = {
        "lora": ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
        "dora": ac.LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"], use_dora=True,
                              init_lora_weights=False),
        "bias": ac.LoraConfig(r=3, target_modules=["q_proj", "lm_head"], lora_bias=True, init_lora_weights=False),
        "emb": ac.LoraConfig(r=5, target_modules=["embed_tokens", "up_proj"], init_lora_weights=False),
        "ia3": ac.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False),
    }
    for name, cfg in configs.items():
        ac.inject_adapter_in_model(cfg, model, name)
    with torch.no_grad():  # DoRA magnitudes away from their initial norms, so DoRA differs from LoRA
        model.up_proj.lora_magnitude_vector["dora"].weight.mul_(1.3)
    return model.eval(), list(configs)


def _alone(model, ids, name):
    if name == "__base__":
        ac.disable_adapters(model)
        out = model(ids)
        ac.enable_adapters(model)
        return out
    ac.set_adapter(model, name)
    return model(ids)


@pytest.mark.parametrize("segment_len", [None, 1, 3, 64])
def test_token_batch_equals_each_adapter_alone(segment_len):
    model, names = _model()
    # Runs of different lengths (prefill chunks) next to single tokens (decode steps).
    plan = [("lora", 7), ("ia3", 1), ("__base__", 3), ("dora", 1), ("emb", 5), ("bias", 1), ("lora", 2),
            ("ia3", 4), ("emb", 1), ("dora", 6)]
    token_names = [n for n, k in plan for _ in range(k)]
    ids = torch.randint(0, 50, (len(token_names),))
    with torch.inference_mode():
        with ac.token_batch(model, token_names, segment_len=segment_len):
            mixed = model(ids.view(1, -1))[0]
        for t, name in enumerate(token_names):
            alone = _alone(model, ids[t:t + 1].view(1, 1), name)[0, 0]
            torch.testing.assert_close(mixed[t], alone, atol=1e-5, rtol=0)
        base = _alone(model, ids.view(1, -1), "__base__")[0]
    adapted = [t for t, n in enumerate(token_names) if n != "__base__"]
    assert (mixed[adapted] - base[adapted]).abs().amax(dim=-1).min() > 1e-3, "some adapter did nothing"


def test_token_batch_accepts_slot_tensor():
    model, names = _model()
    token_names = ["lora", "lora", "ia3", "__base__", "emb"]
    slots = torch.tensor([ac.adapter_slot(model, n) for n in token_names])
    ids = torch.randint(0, 50, (len(token_names),))
    with torch.inference_mode():
        with ac.token_batch(model, token_names):
            by_name = model(ids)
        with ac.token_batch(model, slots):
            by_slot = model(ids)
    torch.testing.assert_close(by_name, by_slot, atol=0, rtol=0)


def test_token_batch_rejects_unknown_slot_and_wrong_length():
    model, _ = _model()
    with pytest.raises(ac.UnknownAdapterError, match="slot"):
        with ac.token_batch(model, torch.tensor([0, 99])):
            pass
    with pytest.raises(ValueError, match="token batch of 3 tokens"):
        with torch.inference_mode(), ac.token_batch(model, ["lora"] * 3):
            model(torch.zeros(1, 4, dtype=torch.long))


def test_segments_cover_every_token_once():
    slots = torch.tensor([1, 1, 1, 1, 1, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 5])
    for seg_len in (1, 2, 3, 4, 16):
        m = BatchMapping.tokens(slots, segment_len=seg_len)
        x = torch.arange(len(slots), dtype=torch.float32).view(-1, 1)
        segs = m.to_segments(x)                                  # [G, L, 1]
        assert segs.shape[1] == seg_len or m.gather is None
        back = m.from_segments(segs, x.shape)
        torch.testing.assert_close(back, x)
        if m.gather is not None:                                 # every segment holds one slot only
            assert torch.equal(slots[m.gather], m.seg_slots[:, None].expand_as(m.gather))


def test_mapping_built_on_the_host_moves_whole():
    """`to` moves every tensor of a mapping built from host slots (token_batch's way on a GPU: no wait for the
    device while the segments are found), keeps seg_slots the very tensor slots is when it was, leaves the
    segments and key unchanged, and is the mapping itself on its own device."""
    slots = torch.tensor([1, 1, 1, 2, 0, 0, 3])
    scales = torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 2.0])
    for seg_len in (1, 2):
        m = BatchMapping.tokens(slots, segment_len=seg_len, scales=scales)
        assert m.to(torch.device("cpu")) is m
        moved = m.to(torch.device("meta"))
        tensors = ("slots", "seg_slots", "gather", "scatter", "scales")
        for name in tensors:
            before, after = getattr(m, name), getattr(moved, name)
            assert (before is None) == (after is None), name
            if after is not None:
                assert after.device.type == "meta" and after.shape == before.shape and after.dtype == before.dtype
        assert (moved.seg_slots is moved.slots) == (m.seg_slots is m.slots)
        assert (moved.key, moved.seg_len, moved.all_base, moved.layout) == (m.key, m.seg_len, m.all_base, m.layout)
        assert m.slots.device.type == "cpu"                            # the original is untouched


@pytest.mark.parametrize("layout", ["rows", "tokens"])
def test_all_base_batch_skips_adapter_work_and_equals_base(layout):
    model, names = _model()
    ids = torch.randint(0, 50, (4, 3))
    with torch.inference_mode():
        with ac.mixed_batch(model, names):                  # stacks exist and hold every adapter
            model(torch.zeros(len(names), 1, dtype=torch.long))
        stacks = [m.stack for m in ac.model_tree.slot_table(model).modules if getattr(m, "stack", None)]
        versions = [(s.version, s._gathered[0]) for s in stacks]
        batch = (ac.mixed_batch(model, ["__base__"] * 4) if layout == "rows"
                 else ac.token_batch(model, ["__base__"] * ids.numel()))
        with batch:
            out = model(ids if layout == "rows" else ids.view(1, -1))
        base = _alone(model, ids, "__base__")
    assert torch.equal(out.view_as(base), base)
    assert [(s.version, s._gathered[0]) for s in stacks] == versions      # nothing gathered for slot 0


def test_gathered_rows_across_mappings_keep_results_exact():
    """The torch path's gathered rows are kept while the mapping stays: a sequence of different mappings
    (and leaving inference mode, whose tensors cannot be written outside it) gives exactly what a fresh
    model gives for each."""
    model, names = _model()
    ids = torch.randint(0, 50, (6, 1))
    mappings = [["lora", "dora", "bias", "emb", "ia3", "__base__"], ["emb", "lora", "__base__", "ia3", "dora", "bias"]]
    outs = []
    for i, names_ in enumerate(mappings + mappings[:1]):
        mode = torch.inference_mode() if i < 2 else torch.no_grad()
        with mode, ac.token_batch(model, names_):
            outs.append(model(ids.view(1, -1))[0])
    for names_, out in zip(mappings + mappings[:1], outs):
        fresh, _ = _model()
        with torch.no_grad(), ac.token_batch(fresh, names_):
            assert torch.equal(out, fresh(ids.view(1, -1))[0])
    assert not torch.equal(outs[0], outs[1])


def test_check_edits_false_trusts_api_changes_only():
    """`check_edits=False` (the engine's setting) skips the scan for tensors replaced outside adapters_core,
    but still picks up every change made through its functions, which invalidate. LoRA factors are read in
    place, so an in-place edit shows at once either way."""
    model, names = _model()
    ids = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(5))
    adapters = ["lora"] * 6

    def run(check_edits):
        with ac.token_batch(model, adapters, check_edits=check_edits):
            return model(ids)

    first = run(False)
    torch.testing.assert_close(first, _alone(model, ids, "lora"))
    lora_b = model.q_proj.lora_B["lora"].weight
    with torch.no_grad():
        lora_b.mul_(3)                                          # an in-place edit outside adapters_core
    tripled = run(False)                                        # read in place: seen without a scan
    torch.testing.assert_close(tripled, _alone(model, ids, "lora"))
    assert not torch.allclose(tripled, first)
    model.q_proj.lora_B["lora"].weight = torch.nn.Parameter(lora_b.detach() * 2)   # replaced outside it
    assert torch.equal(run(False), tripled)                     # not scanned for: the old factor stays
    edited = run(True)                                          # the default scan sees it
    torch.testing.assert_close(edited, _alone(model, ids, "lora"))
    assert not torch.allclose(edited, tripled)

    state = ac.get_peft_model_state_dict(model, adapter_name="lora")
    state = {k: v * 0.5 if "lora_B" in k else v for k, v in state.items()}
    ac.set_peft_model_state_dict(model, state, adapter_name="lora")   # a change through the API
    after = run(False)
    torch.testing.assert_close(after, _alone(model, ids, "lora"))
    assert not torch.allclose(after, edited)


def test_deleting_adapters_clears_only_their_slots_and_slots_are_reused():
    """A deleted adapter's slot rows go (its stack entries forgotten), the others' stay and compute as
    before, and an adapter added after reuses the freed slot with its own values; a batch whose adapters
    have no LoRA on an embedding that holds another adapter's ("emb") leaves the embedding as the base's
    (that batch raised a reshape error before)."""
    model, names = _model()
    ids = torch.tensor([3, 7, 11, 2, 5])
    with torch.no_grad():
        batch = ["lora", "bias", "emb", "ia3", "__base__"]
        with ac.token_batch(model, batch):
            before = model(ids)
        lora_slot = ac.adapter_slot(model, "lora")
        ac.delete_adapter(model, "lora")
        stack = model.q_proj.stack
        assert lora_slot not in stack.slot_names and lora_slot not in stack.lora
        assert int(stack.table[lora_slot].abs().sum()) == 0
        with ac.token_batch(model, ["__base__", "bias", "emb", "ia3", "__base__"]):
            after = model(ids)
        torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)
        torch.manual_seed(5)
        ac.inject_adapter_in_model(ac.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                 init_lora_weights=False), model, "fresh")
        assert ac.adapter_slot(model, "fresh") == lora_slot
        with ac.token_batch(model, ["fresh"] * 5):
            mixed = model(ids)
        torch.testing.assert_close(mixed, _alone(model, ids, "fresh"))
        assert stack.slot_names[lora_slot] == "fresh"


def test_modules_to_save_copies_of_the_embedding_and_the_head_in_a_token_batch():
    """A `modules_to_save` copy of the embedding takes token ids, not features: its tokens are picked from the
    flattened ids (this failed with an IndexError on every token batch, a probe's finding F2)."""
    torch.manual_seed(1)
    model = PerTokenModel()
    configs = {"m_emb": ac.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                      init_lora_weights=False),
               "m_head": ac.LoraConfig(r=2, target_modules=["down_proj"], modules_to_save=["lm_head"],
                                       init_lora_weights=False),
               "lora": ac.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)}
    for name, cfg in configs.items():
        ac.inject_adapter_in_model(cfg, model, name)
    with torch.no_grad():
        for wrapper in (model.embed_tokens, model.lm_head):
            for copy in wrapper.modules_to_save.values():
                for p in copy.parameters():
                    p.add_(0.5 * torch.randn(p.shape))
    model.eval()
    token_names = ["m_emb"] * 3 + ["lora", "__base__", "m_head", "m_head", "m_emb", "lora"]
    ids = torch.randint(0, 50, (len(token_names),))
    with torch.inference_mode():
        with ac.token_batch(model, token_names):
            mixed = model(ids.view(1, -1))[0]
        for t, name in enumerate(token_names):
            torch.testing.assert_close(mixed[t], _alone(model, ids[t:t + 1].view(1, 1), name)[0, 0], atol=1e-5, rtol=0)
        base = _alone(model, ids.view(1, -1), "__base__")[0]
    assert (mixed[[0, 5]] - base[[0, 5]]).abs().amax(dim=-1).min() > 1e-3, "a copy did nothing"
