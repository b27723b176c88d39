"""The engine on the GPU: batching is invisible (requests on different adapters together give the tokens
each gives alone), its greedy tokens are PEFT's greedy choices with the request's adapter (teacher-forced),
and a bf16 run (what a GPU serves by default) repeats itself exactly. Prompts of several lengths, one split
into chunks, so steps mix prefill chunks (SDPA) with decode tokens (the Triton attention) and adapters (the
Triton SGMV)."""
import copy

import peft
import pytest
import torch

import adapters_core as ac
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

from _gpu import (VOCAB, assert_greedy_under, hf_llama, kernel_counts, not_greedy_steps, our_decoder,
                  peft_adapter_folders, triton_expected)

pytestmark = pytest.mark.gpu
ADAPTERS = ["r4", None, "r16rs", "ia3", "r8all", "dora", "r4", "r8all"]
LENGTHS = [5, 9, 70, 3, 21, 12, 40, 8]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return peft_adapter_folders(hf_llama("cpu"), tmp_path_factory.mktemp("gpu_engine"))


def engine_on(device, folders, dtype):
    model = our_decoder(hf_llama(device), device, dtype)
    for name, folder in folders.items():
        ac.load_adapter(model, str(folder), adapter_name=name, autocast_adapter_dtype=False)
    return Engine(model.eval(), EngineConfig(max_batch_size=8, max_seq_len=128, max_batch_tokens=96,
                                             prefill_chunk=32))


def requests(max_tokens=16):
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]
    return [GenerationRequest(p, SamplingParams(max_tokens=max_tokens, temperature=0), a)
            for p, a in zip(prompts, ADAPTERS)]


def test_batching_is_invisible_and_greedy_under_peft(device, folders):
    engine = engine_on(device, folders, torch.float32)
    with kernel_counts() as counts:
        together = engine.generate(requests())
    alone = [engine.generate([r])[0] for r in requests()]
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]
    assert (counts["sgmv"] > 0 and counts["attention"] > 0) == triton_expected(device)
    hf = hf_llama(device)
    for request, out in zip(requests(), together):
        model = hf if request.adapter is None else peft.PeftModel.from_pretrained(
            copy.deepcopy(hf), str(folders[request.adapter]), autocast_adapter_dtype=False).eval()
        assert_greedy_under(model, request.prompt_ids, out.token_ids, device)
        if request.adapter is not None:          # the adapter matters: the base model would not have chosen so
            assert not_greedy_steps(hf, request.prompt_ids, out.token_ids, device), request.adapter


def test_bf16_run_repeats_itself(device, folders):
    engine = engine_on(device, folders, torch.bfloat16)
    with kernel_counts() as counts:
        first = [o.token_ids for o in engine.generate(requests(12))]
    second = [o.token_ids for o in engine.generate(requests(12))]
    assert first == second and all(len(t) == 12 for t in first)
    assert (counts["sgmv"] > 0 and counts["attention"] > 0) == triton_expected(device)


def test_cuda_graphs_change_no_token(device, folders):
    """LoRA adapters (what a decode graph serves) beside base rows, 5 requests (graphs of 8 rows, then fewer as
    they finish): the engine with CUDA graphs gives the eager engine's tokens, its decode steps replayed
    captured graphs (on CUDA), and after another adapter is loaded graphs are captured again and still agree."""
    model = our_decoder(hf_llama(device), device, torch.float32)
    for name in ("r4", "r16rs", "r8all"):
        ac.load_adapter(model, str(folders[name]), adapter_name=name, autocast_adapter_dtype=False)
    model.eval()
    config = dict(max_batch_size=8, max_seq_len=128, max_batch_tokens=96, prefill_chunk=32)
    adapters = ["r4", None, "r16rs", "r8all", "r4"]
    picked = [r for r in requests() if r.adapter in adapters][:5]
    eager = Engine(model, EngineConfig(**config, cuda_graphs=False))
    graphed = Engine(model, EngineConfig(**config))
    assert [o.token_ids for o in graphed.generate(picked)] == [o.token_ids for o in eager.generate(picked)]
    if torch.device(device).type == "cuda":
        assert graphed.graphs.failed is None and graphed.graphs.replays > 0 and graphed.graphs.captures >= 1
    captures = graphed.graphs.captures if graphed.graphs is not None else 0
    ac.load_adapter(model, str(folders["r4"]), adapter_name="again", autocast_adapter_dtype=False)
    model.eval()
    again = [GenerationRequest(r.prompt_ids, r.params, "again" if r.adapter == "r4" else r.adapter) for r in picked]
    assert [o.token_ids for o in graphed.generate(again)] == [o.token_ids for o in eager.generate(picked)]
    if torch.device(device).type == "cuda":
        assert graphed.graphs.captures > captures and graphed.graphs.failed is None
