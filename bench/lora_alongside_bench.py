"""Decode steps of sequences each on a LoRA adapter of its own (16 by default) vs the base, with the step's LoRA
deltas computed three ways: beside each matmul on its threads (`direct_step.LORA_BESIDE`, the default), after it
with the factors fetched into the cache alongside the matmul (`direct_step.FACTORS_ALONGSIDE`), or after it
reading the factors from memory.

The base weights are served as `--weight-format` (fp32 / bf16: the embedded GGUF converted at load as the
service's setting does; gguf: as stored, Q4_1 with a Q8_0 head); `--sequences` adapters of rank `--rank` on all
seven projections are held in bf16 (the peer benchmark's `--adapter-dtype bfloat16`). Each round runs the
requests x `--new-tokens` on the base and on the adapters side by side (two engines on the same model, stepped in
turn), the adapters' steps taking the three ways in turn, so all see the same moments of a memory system whose
bandwidth moves by 10-20 % within a minute (and, on a shared machine, by far more between one minute and the
next). Prints the median decode-step time of each, and adapters / base for each. Usage:
    .venv/bin/python bench/lora_alongside_bench.py [--weight-format fp32] [--rounds 5] [--rank 16] [--sequences 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from service.model import direct_step  # noqa: E402
from service.model.decoder import Decoder  # noqa: E402
from service.model.gguf_loader import default_model_path, load_gguf  # noqa: E402
from service.model.huge_pages import weights_on_huge_pages  # noqa: E402
from service.model.weight_format import store_weights  # noqa: E402

PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapters(config, count: int, rank: int, directory: str) -> list[str]:
    """PEFT-format folders of `count` random LoRA adapters (bf16 factors, all seven projections)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
              "o_proj": (q, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
              "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    paths = []
    for a in range(count):
        g = torch.Generator().manual_seed(a)
        tensors = {}
        for layer in range(c.num_hidden_layers):
            for proj, parent in PARENTS.items():
                fan_in, fan_out = shapes[proj]
                key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
                tensors[key + ".lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) * 0.02).bfloat16()
                tensors[key + ".lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.02).bfloat16()
        path = os.path.join(directory, f"a{a}")
        os.makedirs(path)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as fh:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PARENTS),
                       "base_model_name_or_path": "SmolLM2-135M-Instruct"}, fh)
        paths.append(path)
    return paths


MODES = {"beside": (True, True), "alongside": (False, True), "memory": (False, False)}   # (BESIDE, ALONGSIDE)


def engine_for(model, prompts, adapters, new_tokens, eos) -> tuple[Engine, list]:
    """An engine on `model` with the requests (one per prompt, on its adapter) submitted and warmed up, and the
    list its step listener keeps the last step's stats in."""
    engine = Engine(model, EngineConfig(max_batch_size=len(prompts), max_seq_len=256, max_batch_tokens=1024,
                                        prefill_chunk=256), eos_token_ids=eos)
    engine.generate([GenerationRequest(p, SamplingParams(max_tokens=2, temperature=0), a)
                     for p, a in zip(prompts, adapters)])                     # warm: stacks, cache, kernels
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for p, a in zip(prompts, adapters):
        engine.submit(GenerationRequest(p, params, a), lambda event: None)
    last: list = [None]
    engine.step_listeners.append(lambda stats: last.__setitem__(0, stats))
    return engine, last


def decode_steps(model, prompts, adapters, new_tokens, eos) -> dict[str, list[float]]:
    """Seconds of each decode step (prefill steps left out) of one run of the requests on the base and one on
    the adapters, side by side: two engines on the same model stepped in turn (base, adapters, base, ...), the
    adapters' steps taking the modes (MODES) in turn. Keyed "base" and by mode."""
    engines = [("base",) + engine_for(model, prompts, [None] * len(prompts), new_tokens, eos),
               ("lora",) + engine_for(model, prompts, adapters, new_tokens, eos)]
    times: dict[str, list[float]] = {"base": [], **{mode: [] for mode in MODES}}
    step = 0
    try:
        while any(engine.has_work() for _, engine, _ in engines):
            for kind, engine, last in engines:
                if not engine.has_work():
                    continue
                mode = list(MODES)[step % len(MODES)] if kind == "lora" else "base"
                direct_step.LORA_BESIDE, direct_step.FACTORS_ALONGSIDE = MODES.get(mode, MODES["beside"])
                start = time.perf_counter()
                engine.step()
                took = time.perf_counter() - start
                stats = last[0]
                if step >= 2 and stats is not None and stats.tokens == stats.sequences == len(prompts):  # decode
                    times[mode].append(took)
            step += 1
    finally:
        direct_step.LORA_BESIDE, direct_step.FACTORS_ALONGSIDE = MODES["beside"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weight-format", default="fp32", choices=["fp32", "bf16", "gguf"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--sequences", type=int, default=16, help="sequences, each on an adapter of its own")
    args = parser.parse_args()
    loaded = load_gguf(default_model_path(), keep_stored=args.weight_format == "gguf")
    if args.weight_format != "gguf":
        store_weights(loaded, args.weight_format)
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, stored=loaded.stored, max_positions=256)
    weights_on_huge_pages(model)                   # as the service does (setting weight_huge_pages)
    tok = loaded.tokenizer
    eos = sorted(tok.eos_token_ids)
    n = args.sequences
    prompts = [tok.encode(f"Write a short paragraph about topic number {i}.") for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, path in enumerate(write_adapters(loaded.config, n, args.rank, tmp)):
            ac.load_adapter(model, path, adapter_name=f"a{i}", autocast_adapter_dtype=False,
                            factor_dtype=torch.bfloat16)
            names.append(f"a{i}")
    lora: dict[str, list[float]] = {"base": [], **{mode: [] for mode in MODES}}

    def work():                               # the engine steps in a thread of its own: so does this
        with torch.inference_mode():
            for _ in range(args.rounds):
                for mode, times in decode_steps(model, prompts, names, args.new_tokens, eos).items():
                    lora[mode].extend(times)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    base = lora.pop("base")
    b = statistics.median(base)
    print(f"weights {args.weight_format}, {n} sequences, {n} adapters r={args.rank} (bf16, all projections), "
          f"{args.rounds} rounds; median decode step:")
    print(f"  {'base':<46} {b * 1e3:7.2f} ms  ({len(base)} steps)")
    labels = {"beside": "deltas beside each matmul", "alongside": "after it, factors fetched alongside",
              "memory": "after it, factors from memory"}
    for mode, label in labels.items():
        t = statistics.median(lora[mode])
        print(f"  {'adapters, ' + label:<46} {t * 1e3:7.2f} ms  adapters / base {b / t:.3f}")


if __name__ == "__main__":
    main()
