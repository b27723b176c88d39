"""Prompt-learning requests in the engine: prompt tuning, P-tuning and prefix tuning adapters (made and saved
by peft) share engine steps with LoRA, IA3, AdaLoRA and base requests; each request's greedy tokens equal the
same request run alone and a greedy loop over `PeftModelForCausalLM.forward` on the transformers twin of the
decoder, with chunked prefill, one-token prompts and the context limit counting the virtual tokens."""
import pytest
import torch
import transformers

import adapters_core as ac
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

from _tiny import HF_KW, prompt, tiny_decoder
from prompt_folders import greedy, make_prompt_adapter, peft_logits, peft_reference

STEPS = 16
# adapter name -> (kind in prompt_folders.KINDS, num_virtual_tokens)
PROMPT_ADAPTERS = {"pt": ("prompt", 5), "ptune": ("ptuning_lstm", 7), "ptune_mlp": ("ptuning_mlp", 3),
                   "prefix": ("prefix_proj", 4), "prefix_plain": ("prefix", 6)}


def tiny_hf(seed: int = 0) -> transformers.LlamaForCausalLM:
    """The transformers model whose weights `tiny_decoder(seed)` holds (same seed, same construction)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW)).eval()
    torch.random.set_rng_state(state)
    return hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, model = tiny_hf(0), tiny_decoder(0)
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight)
    ac.inject_adapter_in_model(ac.AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj", "up_proj"]),
                               model, "ada")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():            # E starts at zero: give the AdaLoRA triplets values that matter
        for name, p in model.named_parameters():
            if ".adalora_" in name and name.endswith(".ada"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    ac.set_adapter(model, [])
    refs = {}
    for i, (name, (kind, nvt)) in enumerate(PROMPT_ADAPTERS.items()):
        folder = tmp_path_factory.mktemp(name)
        make_prompt_adapter(hf, kind, i % 2 == 0, folder, seed=10 + i, num_virtual_tokens=nvt)
        ac.load_adapter(model, str(folder), adapter_name=name)
        refs[name] = peft_reference(hf, folder)
    return model, hf, refs


def engine(model, **kw):
    cfg = dict(max_batch_size=9, max_seq_len=128, max_batch_tokens=48, prefill_chunk=16)
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def request(ids, adapter, max_tokens=STEPS):
    return GenerationRequest(list(ids), SamplingParams(max_tokens=max_tokens, temperature=0), adapter)


def oracle(refs, hf, adapter, ids, steps=STEPS):
    """Greedy tokens by PEFT's forward (prompt learning) or the plain transformers model (base)."""
    logits = (lambda s: peft_logits(refs[adapter], s)) if adapter else (lambda s: hf(input_ids=s).logits)
    return greedy(logits, torch.tensor([ids]), steps)[0]


def test_mixed_step_equals_alone_and_peft(setup):
    model, hf, refs = setup
    adapters = ["pt", "ptune", "lora0", "prefix", "ia3", None, "ptune_mlp", "prefix_plain", "ada"]
    reqs = [request(prompt(i, 6 + 3 * i), a) for i, a in enumerate(adapters)]
    eng = engine(model)
    together = eng.generate(reqs)
    alone = [eng.generate([request(r.prompt_ids, r.adapter)])[0] for r in reqs]
    for r, t, a in zip(reqs, together, alone):
        assert t.token_ids == a.token_ids and len(t.token_ids) == STEPS, r.adapter
        if r.adapter in PROMPT_ADAPTERS or r.adapter is None:
            assert t.token_ids == oracle(refs, hf, r.adapter, r.prompt_ids), r.adapter
    same = prompt(99, 9)              # the adapters really change the continuation of one prompt
    outs = eng.generate([request(same, a) for a in [None, *PROMPT_ADAPTERS, "ada"]])
    assert all(o.token_ids != outs[0].token_ids for o in outs[1:])


@pytest.mark.parametrize("adapter", ["pt", "prefix"])
def test_chunked_prefill_and_one_token_prompts(setup, adapter):
    model, hf, refs = setup
    long_prompt = prompt(7, 45)
    expected = oracle(refs, hf, adapter, long_prompt, 8)
    for chunk in (4, 16, 128):
        eng = engine(model, prefill_chunk=chunk, max_batch_tokens=128)
        out = eng.generate([request(long_prompt, adapter, 8), request(prompt(8, 3), "lora1", 8)])[0]
        assert out.token_ids == expected, chunk
    one = [int(prompt(5, 1)[0])]                  # a one-token prompt runs on the decode path at position NVT
    assert engine(model).generate([request(one, adapter, 8)])[0].token_ids == oracle(refs, hf, adapter, one, 8)


def test_virtual_tokens_count_against_max_seq_len(setup):
    model, _, _ = setup
    eng = engine(model, max_seq_len=32)
    nvt = PROMPT_ADAPTERS["ptune"][1]
    with pytest.raises(ValueError, match=f"{nvt} virtual tokens"):
        eng.validate(request(prompt(1, 20), "ptune", 32 - 20 - nvt + 1))
    eng.validate(request(prompt(1, 20), "ptune", 32 - 20 - nvt))
    eng.validate(request(prompt(1, 20), None, 12))
    out = eng.generate([GenerationRequest(prompt(1, 20), SamplingParams(max_tokens=32 - 20 - nvt, temperature=0,
                                                                        ignore_eos=True), "ptune")])[0]
    assert len(out.token_ids) == 32 - 20 - nvt and out.prompt_ids == prompt(1, 20)


def test_virtual_keys_values_computed_once_per_loaded_adapter(setup, tmp_path):
    model, hf, _ = setup
    eng = engine(model)
    first = eng.virtual_tokens.key_values("pt")
    assert eng.virtual_tokens.key_values("pt")[0] is first[0]
    assert first[0].shape == (HF_KW["num_hidden_layers"], HF_KW["num_key_value_heads"], 5,
                              HF_KW["hidden_size"] // HF_KW["num_attention_heads"])
    make_prompt_adapter(hf, "prompt", True, tmp_path, seed=77, num_virtual_tokens=5)
    ac.load_adapter(model, str(tmp_path), adapter_name="pt_tmp")
    try:
        eng.virtual_tokens.key_values("pt_tmp")
    finally:
        ac.delete_adapter(model, "pt_tmp")
    ac.load_adapter(model, str(tmp_path), adapter_name="pt_tmp")    # same name, a new load: computed again
    try:
        again = eng.virtual_tokens.key_values("pt_tmp")
        assert eng.virtual_tokens._entries["pt_tmp"][0] is ac.prompt_adapter(model, "pt_tmp")
        assert again[0].shape[2] == 5
    finally:
        ac.delete_adapter(model, "pt_tmp")


@torch.no_grad()
def test_logprobs_match_peft_forward(setup):
    """Each chosen token's log-probability within 1e-4 of PEFT's forward: a position or cache-layout slip (real
    tokens from 0, rotated prefix keys) moves them by ~1e-3 or more even where the greedy tokens survive."""
    model, _, refs = setup
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=True)
    ids = prompt(11, 10)
    outs = engine(model).generate([GenerationRequest(list(ids), params, a) for a in PROMPT_ADAPTERS])
    for name, out in zip(PROMPT_ADAPTERS, outs):
        seq = torch.tensor([ids + out.token_ids])
        logprobs = torch.log_softmax(peft_logits(refs[name], seq)[0], dim=-1)      # [rows, V]
        rows = logprobs[-len(out.token_ids) - 1:-1]                                  # the rows that chose them
        expected = rows[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
        assert out.token_ids == rows.argmax(-1).tolist(), name
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0)
