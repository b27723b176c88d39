"""The embedded default model end to end against transformers: SmolLM2-135M-Instruct loaded from the same
GGUF file by our loader and by transformers' own GGUF loader gives the same logits, the same greedy
continuations (our engine vs transformers' generate), and a PEFT LoRA adapter gives the same logits on both."""

import copy

import pytest
import torch

import adapters_core as ac
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.model.decoder import Decoder

from _model_fixtures import hf_gguf_model, our_gguf_model, random_peft_lora

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at", "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def models():
    loaded = our_gguf_model()          # both loads are cached for the whole test run
    ours = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=torch.float32, max_positions=512)
    return loaded, ours, hf_gguf_model()


def test_logits_equal_transformers_gguf_loader(models):
    loaded, ours, hf = models
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[0] + " Paris, and the capital of Spain is Madrid.")])
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_greedy_continuations_equal_transformers_generate(models):
    loaded, ours, hf = models
    engine = Engine(ours, EngineConfig(max_batch_size=5, max_seq_len=256), eos_token_ids=[loaded.config.eos_token_id])
    requests = [GenerationRequest(loaded.tokenizer.encode(p), SamplingParams(max_tokens=32, temperature=0))
                for p in PROMPTS]
    outputs = engine.generate(requests)
    for req, out in zip(requests, outputs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([req.prompt_ids]), max_new_tokens=32, do_sample=False)[0]
        ref = ref[len(req.prompt_ids):].tolist()
        if ref and ref[-1] == loaded.config.eos_token_id:
            ref = ref[:-1]
        assert out.token_ids == ref
    assert sum(len(o.token_ids) for o in outputs) > 60


def test_peft_lora_on_transformers_equals_lora_on_our_decoder(models, tmp_path):
    loaded, ours, hf = models
    pm = random_peft_lora(hf, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"])
    pm.save_pretrained(tmp_path / "lora")
    mine = copy.deepcopy(ours)
    ac.load_adapter(mine, str(tmp_path / "lora"))
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[2])])
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        out = mine(ids)
        base = ours(ids)
    assert (ref - base).abs().max() > 0.1, "the adapter must change the logits"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
