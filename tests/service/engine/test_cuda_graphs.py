"""The engine's CUDA-graph decode path (service/engine/cuda_graphs.py), checked on the CPU.

What a graph records is the forward over its static buffers: padded rows on the base model writing the cache's
spare row, the adapters read through `BatchMapping.token_buffer` by the Triton SGMV, the decode attention from
the cache slots and lengths in the buffer. Here that path runs as the GPU runs it (the Triton kernels under
Triton's interpreter, the C++ CPU kernels off), with each "capture" recorded as an eager replay of the same
forward, so every step of the bookkeeping is checked against the plain engine: tokens equal, graphs replayed,
captured again after adapters change, and never used where they cannot serve (IA3, per-request scales). The
capture itself is CUDA's: tests/gpu/test_engine_gpu.py checks it on a GPU.
"""
import os

import pytest
import torch

import adapters_core as ac
from adapters_core import cuda_lora, sgmv
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.engine.cuda_graphs import DecodeGraphs, buckets
from service.model import cpu_ops, cuda_ops

from _tiny import prompt, tiny_decoder

ADAPTERS = ["lora0", None, "lora2", "lora1", "lora0"]


def _eager_record(self, forward):
    hidden = forward()
    return (lambda: hidden.copy_(forward())), hidden


@pytest.fixture
def graph_path(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present: tests/gpu checks the graphs on it)")
    monkeypatch.setattr(sgmv, "kernel", lambda arch="native": None)
    monkeypatch.setattr(cpu_ops, "kernel", lambda: None)
    monkeypatch.setattr(cuda_lora._KERNELS, "mode", "1")
    monkeypatch.setattr(cuda_ops._KERNELS, "mode", "1")
    monkeypatch.setattr(DecodeGraphs, "applies_to", staticmethod(lambda device: True))
    monkeypatch.setattr(DecodeGraphs, "_record", _eager_record)


def lora_model(ranks=(2, 4, 6)):
    model = tiny_decoder(adapters=False)
    for i, r in enumerate(ranks):
        add_lora(model, f"lora{i}", r)
    return model


def add_lora(model, name, r):
    config = ac.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False)
    ac.inject_adapter_in_model(config, model, name)
    model.eval()


def engine(model, graphs: bool) -> Engine:
    return Engine(model, EngineConfig(max_batch_size=8, max_seq_len=64, max_batch_tokens=64, prefill_chunk=16,
                                      cuda_graphs=graphs))


def requests(adapters=ADAPTERS, scales=None):
    scales = scales or [1.0] * len(adapters)
    return [GenerationRequest(prompt(i, 3 + 2 * i), SamplingParams(max_tokens=8, temperature=0), a, adapter_scale=s)
            for i, (a, s) in enumerate(zip(adapters, scales))]


def tokens(outputs):
    return [o.token_ids for o in outputs]


def test_buckets_cover_every_batch_size():
    assert buckets(1) == [1] and buckets(2) == [1, 2] and buckets(5) == [1, 2, 4, 5]
    assert buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def test_decode_steps_replay_graphs_with_the_eager_tokens(graph_path):
    model = lora_model()
    expected = tokens(engine(model, graphs=False).generate(requests()))
    graphed = engine(model, graphs=True)
    assert graphed.cache.k.shape[1] == 9 and graphed.cache.spare == 8      # a spare row no request owns
    assert tokens(graphed.generate(requests())) == expected
    graphs = graphed.graphs
    # 7 decode steps of 5 sequences: the first waits a step (adapters just synced), then one capture for 8 rows
    assert graphs.captures == 1 and graphs.replays == 6 and graphs.failed is None
    assert sorted(graphs._graphs) == [8]
    # the adapters matter in these steps: the base model alone answers differently
    assert tokens(engine(lora_model(), graphs=False).generate(requests([None] * 5))) != expected


def test_graphs_are_captured_again_when_adapters_change(graph_path):
    model = lora_model()
    graphed = engine(model, graphs=True)
    graphed.generate(requests())
    first = graphed.graphs.captures
    add_lora(model, "late", 8)                                   # a larger rank: every padded stack grows
    ac.delete_adapter(model, "lora1")
    changed = ["late", None, "lora2", "late", "lora0"]
    expected = tokens(engine(model, graphs=False).generate(requests(changed)))
    assert tokens(graphed.generate(requests(changed))) == expected
    assert graphed.graphs.captures == first + 1 and graphed.graphs.replays > 6


def test_prompt_learning_requests_ride_the_graphs(graph_path, tmp_path):
    """Prompt-learning requests run on the base weights (slot 0) after their virtual tokens in the cache: their
    decode steps replay the graphs beside LoRA and base requests, with the eager engine's tokens."""
    import transformers
    from _tiny import HF_KW
    from prompt_folders import make_prompt_adapter

    torch.manual_seed(0)                    # tiny_decoder(0)'s weights: the same seed, the same construction
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW)).eval()
    model = lora_model()
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight)
    for name, kind, tokens_ in (("prefix", "prefix_proj", 4), ("pt", "prompt", 5)):
        make_prompt_adapter(hf, kind, True, tmp_path / name, seed=3, num_virtual_tokens=tokens_)
        ac.load_adapter(model, str(tmp_path / name), adapter_name=name)
    adapters = ["prefix", "lora0", None, "pt", "lora2"]
    graphed = engine(model, graphs=True)
    assert tokens(graphed.generate(requests(adapters))) == tokens(engine(model, False).generate(requests(adapters)))
    assert graphed.graphs.replays == 6 and graphed.graphs.captures == 1
    alone = [tokens(engine(model, False).generate(requests([a])))[0] for a in ("prefix", "pt")]
    assert alone[0] != alone[1]             # the virtual tokens matter


def test_what_graphs_cannot_serve_runs_eagerly(graph_path):
    model = tiny_decoder()                       # IA3 on k_proj / down_proj beside the LoRA adapters
    graphed = engine(model, graphs=True)
    adapters = ["ia3", "lora0", None, "lora3", "lora1"]
    assert tokens(graphed.generate(requests(adapters))) == tokens(engine(model, False).generate(requests(adapters)))
    assert graphed.graphs.replays == 0 == graphed.graphs.captures
    scaled = engine(lora_model(), graphs=True)                   # a request's adapter_scale: no graph either
    scaled.generate(requests(scales=[1.0, 1.0, 0.5, 1.0, 1.0]))
    assert scaled.graphs.replays == 0


def test_graphs_stay_off_on_the_cpu():
    model = lora_model()
    plain = engine(model, graphs=True)
    assert plain.graphs is None and plain.cache.spare is None and plain.cache.k.shape[1] == 8
    assert not DecodeGraphs.applies_to(torch.device("cpu"))
