"""Against PEFT on the transformers twin of the tiny decoder: a request's `adapter_scale` s gives PEFT's
model with the adapter's `scaling` multiplied by s (prompt log-probabilities, generated log-probabilities and
greedy tokens), scale 1 beside scaled neighbours keeps exactly the bits of an unscaled step, a merged adapter
(add_weighted_adapter, linear and ties) served by the engine gives PEFT's merged model, and prompt
log-probabilities (chunked prefill, in a mixed batch, with top alternatives) are the reference forward's
log-softmax at every prompt position, for the requests that ask only. Refusals name `adapter_scale`."""
import copy

import peft
import pytest
import torch
import transformers

import adapters_core as ac
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

from _tiny import HF_KW, prompt, tiny_decoder

STEPS = 6


def tiny_hf(seed: int = 0) -> transformers.LlamaForCausalLM:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW)).eval()
    torch.random.set_rng_state(state)
    return hf


def peft_lora(hf, folder, seed, **kw):
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, model = tiny_hf(0), tiny_decoder(0, adapters=False)
    folders = {
        "a": peft_lora(hf, tmp_path_factory.mktemp("a"), 1, r=4, lora_alpha=8,
                       target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": peft_lora(hf, tmp_path_factory.mktemp("b"), 2, r=4, lora_alpha=4, use_rslora=True,
                       target_modules=["k_proj", "v_proj", "up_proj"]),
    }
    for name, folder in folders.items():
        ac.load_adapter(model, str(folder), adapter_name=name)
    ac.inject_adapter_in_model(ac.IA3Config(target_modules=["k_proj"]), model, "ia3")
    ac.set_adapter(model, [])
    return model, hf, folders


def engine(model, **kw):
    cfg = dict(max_batch_size=8, max_seq_len=96, max_batch_tokens=40, prefill_chunk=7)
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def request(ids, adapter=None, scale=1.0, prompt_logprobs=None, logprobs=True):
    return GenerationRequest(list(ids), SamplingParams(max_tokens=STEPS, temperature=0, logprobs=logprobs), adapter,
                             adapter_scale=scale, prompt_logprobs=prompt_logprobs)


def peft_model(hf, folders, names, scale=1.0):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folders[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(folders[n]), adapter_name=n)
    for module in pm.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for n in list(module.scaling):
                module.scaling[n] *= scale
    return pm.eval()


def reference(model_fn, out):
    """Log-probabilities of the whole sequence (prompt + generated) under `model_fn`: [len - 1] of the token
    that follows each position, and the greedy continuation's logits argmax."""
    ids = torch.tensor([out.prompt_ids + out.token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model_fn(ids).float(), dim=-1)[0]          # [T, V]
    return logprobs, logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0]


def check_against(model_fn, out, atol=1e-4):
    logprobs, chosen = reference(model_fn, out)
    n = len(out.prompt_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    engine_prompt = torch.tensor([lp for lp, _ in out.prompt_logprobs[1:]])
    torch.testing.assert_close(engine_prompt, chosen[:n - 1], atol=atol, rtol=0)
    torch.testing.assert_close(torch.tensor(out.logprobs), chosen[n - 1:], atol=atol, rtol=0)
    assert out.token_ids == logprobs[n - 1:n - 1 + len(out.token_ids)].argmax(-1).tolist()       # greedy


@pytest.mark.parametrize("scale", [0.5, -1.0, 2.5, 0.0])
def test_adapter_scale_equals_peft_with_scaled_scaling(setup, scale):
    model, hf, folders = setup
    eng = engine(model)
    ids = prompt(3, 17)
    reqs = [request(ids, "a", scale, prompt_logprobs=0), request(prompt(4, 9), "b", 1.0, prompt_logprobs=0),
            request(ids, "a", 1.0, prompt_logprobs=0)]
    scaled, _, unscaled = eng.generate(reqs)
    pm = peft_model(hf, folders, ["a"], scale)
    check_against(lambda x: pm(input_ids=x).logits, scaled)
    if scale != 1.0:
        assert scaled.prompt_logprobs != unscaled.prompt_logprobs


def test_scale_one_beside_scaled_requests_keeps_every_bit(setup):
    model, _, _ = setup
    eng = engine(model)
    plan = [(prompt(5, 11), "a"), (prompt(6, 4), "b"), (prompt(7, 8), "a"), (prompt(8, 6), None)]
    plain = eng.generate([request(ids, name, 1.0, prompt_logprobs=2) for ids, name in plan])
    mixed = eng.generate([request(ids, name, s, prompt_logprobs=2)
                          for (ids, name), s in zip(plan, [1.0, 0.3, -0.7, 1.0])])
    for i in (0, 3):
        assert mixed[i].prompt_logprobs == plain[i].prompt_logprobs and mixed[i].logprobs == plain[i].logprobs
    assert mixed[1].prompt_logprobs != plain[1].prompt_logprobs


@pytest.mark.parametrize("strategy,density", [("linear", None), ("ties", 0.6)])
def test_merged_adapter_in_the_engine_equals_peft(setup, strategy, density):
    model, hf, folders = setup
    model = copy.deepcopy(model)
    ac.add_weighted_adapter(model, ["a", "b"], [0.8, -0.6], "mix", strategy, density=density)
    ac.set_adapter(model, [])
    pm = peft_model(hf, folders, ["a", "b"])
    pm.add_weighted_adapter(["a", "b"], [0.8, -0.6], "mix", combination_type=strategy, density=density)
    pm.set_adapter("mix")
    eng = engine(model)
    out = eng.generate([request(prompt(9, 13), "mix", prompt_logprobs=0), request(prompt(9, 13), None)])
    check_against(lambda x: pm(input_ids=x).logits, out[0])
    assert out[0].token_ids != out[1].token_ids


def test_prompt_logprobs_only_for_requests_that_ask_with_alternatives(setup):
    model, hf, _ = setup
    eng = engine(model)
    asked = request(prompt(10, 23), None, prompt_logprobs=3)            # 23 tokens: four chunks of 7
    out = eng.generate([asked, request(prompt(11, 12), "a"), request(prompt(12, 30), "b", logprobs=False)])
    assert out[1].prompt_logprobs is None and out[2].prompt_logprobs is None
    check_against(lambda x: hf(input_ids=x).logits, out[0])
    logprobs, _ = reference(lambda x: hf(input_ids=x).logits, out[0])
    for position, (_, top) in enumerate(out[0].prompt_logprobs[1:]):
        values, ids = torch.topk(logprobs[position], 3)
        assert [t for t, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)


def test_refusals_name_the_field(setup):
    model, _, _ = setup
    eng = engine(model)
    for adapter, scale, match in [("ia3", 0.5, "IA3"), (None, 0.5, "base model"), ("a", float("nan"), "finite"),
                                  ("a", 11.0, "finite")]:
        with pytest.raises(ValueError, match=f"adapter_scale.*{match}|{match}.*adapter_scale"):
            eng.validate(request(prompt(1, 4), adapter, scale))
    eng.validate(request(prompt(1, 4), "ia3", 1.0))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        eng.validate(request(prompt(1, 4), "a", prompt_logprobs=21))
