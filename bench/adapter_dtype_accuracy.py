"""What holding adapters in bf16 or fp16 (`ADAPTER_SERVE_ADAPTER_DTYPE`) costs in accuracy, against fp32.

The default model as the service serves it (SmolLM2-135M-Instruct, the GGUF's stored blocks, fp32 activations)
with --adapters random rank-16 fp32 LoRA adapters on all seven projections, made as bench/adapter_scale_bench.py
makes them (PEFT's `init_lora_weights=False`, i.e. nn.Linear's init, then both factors scaled by --scale, 0.1:
deltas the size of a trained adapter's; they grow as the scale squared, so --scale 0.3 makes them ~9x larger).
Each adapter is also loaded as the registry loads it under the setting: its PEFT state dict packed with the
factors cast (`pack_adapter_tensors(..., factor_dtype)`) and held in that dtype (`load_adapter(factor_dtype=...)`).
Request i runs prompt i on adapter i.
  - logits: each request's prompt and its fp32 greedy continuation run teacher-forced (one forward per request,
    the mixed-batch path the engine takes), every position's logits compared with fp32's: max and mean |diff|,
    and how often the argmax (the greedy pick) is the same.
  - greedy: the engine generates --new-tokens tokens per request (all requests in one batch, EOS ignored):
    sequences identical to fp32's, mean tokens before the first difference, tokens equal position by position.
The row "base model" (no adapter) puts the numbers in scale: it is how far the adapters move the outputs.
Usage:
    .venv/bin/python bench/adapter_dtype_accuracy.py [--adapters 16] [--rank 16] [--new-tokens 64] [--scale 0.1]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402
from adapter_scale_bench import random_adapters, serving_model  # noqa: E402
from adapters_core.packing import pack_adapter_tensors, tensor_bytes  # noqa: E402
from engine_bench import TOPICS  # noqa: E402
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def fp32_adapters(model, count: int, rank: int, scale: float) -> list[str]:
    """`count` random rank-`rank` fp32 LoRA adapters (adapter_scale_bench's recipe): their names."""
    names = random_adapters(model, count, rank, scale)
    ac.set_adapter(model, [])
    return names


def held_copies(model, names: list[str], dtype: torch.dtype, suffix: str) -> tuple[list[str], int]:
    """Each adapter loaded again as the registry loads it under adapter_dtype=`dtype`: names, weight bytes."""
    out, nbytes = [], 0
    for name in names:
        tensors = pack_adapter_tensors(ac.get_peft_model_state_dict(model, adapter_name=name), dtype)
        nbytes += tensor_bytes(tensors)
        ac.load_adapter(model, name, adapter_name=f"{name}_{suffix}", config=copy.deepcopy(model.peft_config[name]),
                        state_dict=tensors, low_cpu_mem_usage=True, autocast_adapter_dtype=False, factor_dtype=dtype)
        out.append(f"{name}_{suffix}")
    ac.set_adapter(model, [])
    return out, nbytes


def generate(model, prompts: list[list[int]], adapters: list, new_tokens: int) -> list[list[int]]:
    engine = Engine(model, EngineConfig(max_batch_size=len(prompts), max_seq_len=256, max_batch_tokens=1024,
                                        prefill_chunk=256), eos_token_ids=[])
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return [o.token_ids for o in engine.generate([GenerationRequest(p, params, a) for p, a in zip(prompts, adapters)])]


@torch.inference_mode()
def teacher_forced(model, sequences: list[list[int]], adapters: list) -> list[torch.Tensor]:
    """Each sequence's logits [len, vocab] on its adapter (None: the base model), one forward each."""
    out = []
    for ids, adapter in zip(sequences, adapters):
        with ac.mixed_batch(model, [adapter or "__base__"]):
            out.append(model(torch.tensor([ids]))[0].float())                  # [len, vocab]
    return out


def compare(ref_logits, logits, ref_tokens, tokens) -> dict:
    diffs = [(a - b).abs() for a, b in zip(ref_logits, logits)]
    picks = [(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(ref_logits, logits)]
    prefixes = [next((i for i, (x, y) in enumerate(zip(r, t)) if x != y), len(r))
                for r, t in zip(ref_tokens, tokens)]
    same = sum(x == y for r, t in zip(ref_tokens, tokens) for x, y in zip(r, t))
    return dict(max=max(d.max().item() for d in diffs), mean=torch.cat([d.flatten() for d in diffs]).mean().item(),
                argmax=torch.cat(picks).mean().item(), identical=sum(p == len(r) for p, r in zip(prefixes, ref_tokens)),
                prefix=sum(prefixes) / len(prefixes), tokens=same / sum(len(r) for r in ref_tokens))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--scale", type=float, default=0.1, help="multiplies both factors' random init")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model, loaded = serving_model("gguf")
    tok = loaded.tokenizer
    prompts = [tok.encode(f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}.") for i in range(args.adapters)]
    fp32 = fp32_adapters(model, args.adapters, args.rank, args.scale)
    fp32_bytes = sum(tensor_bytes(ac.get_peft_model_state_dict(model, adapter_name=n)) for n in fp32)
    print(f"model: {loaded.name}, stored GGUF weights, fp32 activations; {args.adapters} requests on as many "
          f"rank-{args.rank} adapters (scale {args.scale}), {args.new_tokens} greedy tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU: {cpu_name()}")
    ref_tokens = generate(model, prompts, fp32, args.new_tokens)
    sequences = [p + t for p, t in zip(prompts, ref_tokens)]
    ref_logits = teacher_forced(model, sequences, fp32)
    rows = {}
    for label, dtype in DTYPES.items():
        names, nbytes = held_copies(model, fp32, dtype, label)
        tokens = generate(model, prompts, names, args.new_tokens)
        rows[label] = dict(compare(ref_logits, teacher_forced(model, sequences, names), ref_tokens, tokens),
                           bytes=nbytes)
        for name in names:
            ac.delete_adapter(model, name)
    base = [None] * args.adapters
    rows["base model (no adapter)"] = dict(compare(ref_logits, teacher_forced(model, sequences, base), ref_tokens,
                                                   generate(model, prompts, base, args.new_tokens)), bytes=0)
    n, new = args.adapters, args.new_tokens
    print(f"\nagainst the same {n} adapters held in fp32 ({fp32_bytes / 2**20:.1f} MiB of weights):\n")
    print("| adapters held in | weights MiB | max abs logit diff | mean abs logit diff | argmax same "
          "(teacher-forced) | greedy sequences identical | mean tokens before first difference | tokens equal "
          f"(of {n} x {new}) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['bytes'] / 2**20:.1f} | {r['max']:.4f} | {r['mean']:.5f} | {100 * r['argmax']:.2f} % "
              f"| {r['identical']} / {n} | {r['prefix']:.1f} | {100 * r['tokens']:.1f} % |")
    return rows


if __name__ == "__main__":
    main()
