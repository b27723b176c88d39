"""The embedded SmolLM2-135M (GQA: 9 query heads, 3 key/value heads) with prompt tuning, P-tuning (MLP, LSTM) and
prefix tuning (plain, projected) adapters made by peft on transformers' GGUF load of the same file, saved with
inference_mode True and False: our engine's greedy continuation equals a greedy loop over
`PeftModelForCausalLM.forward` for 16 tokens, and each chosen token's log-probability agrees within 1e-4."""

import pytest
import torch

import adapters_core as ac
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.model.decoder import Decoder

from _model_fixtures import hf_gguf_model, our_gguf_model
from prompt_folders import KINDS, make_prompt_adapter, peft_logits, peft_reference

pytestmark = pytest.mark.slow

STEPS = 16
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def models():
    loaded = our_gguf_model()
    ours = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=torch.float32, max_positions=512)
    return loaded, ours, hf_gguf_model()


@torch.no_grad()
def peft_greedy(pm, ids: list[int]) -> tuple[list[int], list[float]]:
    seq, logprobs = torch.tensor([ids]), []
    for _ in range(STEPS):
        last = torch.log_softmax(peft_logits(pm, seq)[0, -1], dim=-1)
        token = int(last.argmax())
        logprobs.append(float(last[token]))
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return seq[0, len(ids):].tolist(), logprobs


@pytest.mark.parametrize("inference_mode", [True, False], ids=["inference", "training"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_engine_equals_peft_forward_on_smollm2(models, tmp_path, kind, inference_mode):
    loaded, ours, hf = models
    # prompt rows near SmolLM2's own embedding scale (std 0.14); prefix keys/values at std 0.2 (at 0.5 the scores
    # get so large that fp32 summation order alone moves a log-probability by 2e-4, tokens still equal)
    std = 0.2 if kind.startswith("prefix") else 0.15
    make_prompt_adapter(hf, kind, inference_mode, tmp_path, seed=3, num_virtual_tokens=6, std=std)
    expected, expected_logprobs = peft_greedy(peft_reference(hf, tmp_path), loaded.tokenizer.encode(PROMPT))
    ac.load_adapter(ours, str(tmp_path), adapter_name="p")
    try:
        engine = Engine(ours, EngineConfig(max_batch_size=2, max_seq_len=128))
        ids = loaded.tokenizer.encode(PROMPT)
        params = SamplingParams(max_tokens=STEPS, temperature=0, logprobs=True)
        out, base = engine.generate([GenerationRequest(ids, params, "p"), GenerationRequest(ids, params)])
    finally:
        ac.delete_adapter(ours, "p")
    assert out.token_ids == expected
    assert max(abs(a - b) for a, b in zip(out.logprobs, expected_logprobs)) < 1e-4
    assert out.token_ids != base.token_ids, "the adapter must change the continuation"
