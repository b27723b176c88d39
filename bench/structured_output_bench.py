"""What structured output costs: 16 concurrent JSON-schema requests vs the same run free, on the default model.

SmolLM2-135M-Instruct (the embedded GGUF, dense in the default dtype as in engine_bench.py) with 16 distinct
random rank-16 LoRA adapters, one per request. (c) constrained: 16 chat prompts asking for a person as JSON,
each with a JSON schema (strings with maxLength, a bounded integer, an enum, an array, a boolean; all
required), run to the grammar's end. (f) free: the same 16 requests without the schema, each cut at exactly
the number of tokens its constrained twin generated (EOS ignored), so both runs decode the same tokens per
sequence in the same batch shapes and only the grammar work differs. Rounds interleave (c, f, c, f, ...) and
each reports its median round: on a machine shared with other work the figures are noisy, and interleaving
puts both systems under the same load. Also printed: the share of the constrained run spent in grammar work
(computing the masks, applying them, advancing the matchers). Greedy by default (the free run then takes the
engine's one batched argmax per step, the constrained one a masked argmax per request: the worst case);
`--temperature 0.7` samples both. Usage:
    .venv/bin/python bench/structured_output_bench.py [--rounds 5] [--requests 16] [--temperature 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adapters_core as ac  # noqa: E402
from engine_bench import settle  # noqa: E402
from service.engine import (Constraint, Engine, EngineConfig, GenerationRequest, Grammars,  # noqa: E402
                            SamplingParams)
from service.engine.structured import Guide  # noqa: E402
from service.model.chat_template import render_chat  # noqa: E402
from service.model.decoder import Decoder  # noqa: E402
from service.model.dtype import default_dtype  # noqa: E402
from service.model.gguf_loader import default_model_path, load_gguf  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "hobbies", "student"],
    "additionalProperties": False,
}
PEOPLE = ["a chef", "a pilot", "a student", "a painter", "a farmer", "a nurse", "a poet", "a sailor"]


class TimedGrammars(Grammars):
    """Grammars that add up the seconds of all grammar work: masks, applying them, advancing the matchers."""
    seconds = 0.0

    def fill(self, guides) -> None:
        start = time.perf_counter()
        super().fill(guides)
        self.seconds += time.perf_counter() - start

    def guide(self, constraint) -> Guide:
        guide = super().guide(constraint)
        for name in ("greedy", "apply", "advance"):
            setattr(guide, name, self._timed(getattr(guide, name)))
        return guide

    def _timed(self, method):
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def run(engine: Engine, requests: list[GenerationRequest]) -> dict:
    settle()
    engine.grammars.seconds = 0.0
    start = time.perf_counter()
    outs = engine.generate(requests)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return dict(tps=tokens / wall, wall=wall, tokens=tokens, lengths=[len(o.token_ids) for o in outs],
                mask_share=engine.grammars.seconds / wall, outs=outs)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    dtype = default_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load_gguf(default_model_path())
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=dtype, max_positions=512)
    names = [f"lora{i}" for i in range(args.requests)]
    torch.manual_seed(0)
    for name in names:
        ac.inject_adapter_in_model(ac.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 init_lora_weights=False), model, name)
    tok = loaded.tokenizer
    eos = sorted(tok.eos_token_ids)
    engine = Engine(model, EngineConfig(max_batch_size=args.requests, max_seq_len=512, max_batch_tokens=1024),
                    eos_token_ids=eos, grammars=TimedGrammars(tok, loaded.config.vocab_size, eos))
    prompts = [tok.encode(render_chat(loaded.chat_template, [
        {"role": "user", "content": f"Describe {PEOPLE[i % len(PEOPLE)]} as JSON."}], add_generation_prompt=True),
        add_special_tokens=False) for i in range(args.requests)]
    schema = Constraint.json_schema(SCHEMA, "response_format")
    base = SamplingParams(max_tokens=200, temperature=args.temperature)
    constrained = [GenerationRequest(p, dataclasses.replace(base, seed=i, constraint=schema), a)
                   for i, (p, a) in enumerate(zip(prompts, names))]
    print(f"model: {loaded.name}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.requests} requests on {args.requests} LoRA adapters, temperature {args.temperature}")
    engine.generate(constrained[:2])                            # warm: kernels, grammar cache
    rounds = {"c": [], "f": []}
    for _ in range(args.rounds):
        c = run(engine, [dataclasses.replace(r, request_id=f"{r.request_id}-{time.monotonic_ns()}")
                         for r in constrained])
        free = [GenerationRequest(r.prompt_ids, dataclasses.replace(r.params, constraint=None, ignore_eos=True,
                                                                      max_tokens=n), r.adapter)
                for r, n in zip(constrained, c["lengths"])]
        f = run(engine, free)
        rounds["c"].append(c)
        rounds["f"].append(f)
        print(f"  round: constrained {c['tps']:.1f} tok/s ({c['tokens']} tokens, grammar work {c['mask_share']:.1%}), "
              f"free {f['tps']:.1f} tok/s ({f['tokens']} tokens)")
    med = {k: statistics.median(r["tps"] for r in v) for k, v in rounds.items()}
    ratio = statistics.median(c["tps"] / f["tps"] for c, f in zip(rounds["c"], rounds["f"]))
    share = statistics.median(c["mask_share"] for c in rounds["c"])
    stops = sum(o.finish_reason.value == "stop" for c in rounds["c"] for o in c["outs"])
    print(f"\nmedian tokens/s: constrained {med['c']:.1f}, free {med['f']:.1f}; median per-round ratio "
          f"c/f = {ratio:.3f} (cost {1 - ratio:.1%}; target <= 10%); grammar work {share:.1%} of the constrained run; "
          f"{stops}/{args.requests * args.rounds} constrained answers ended by the grammar")
    print("sample answer:", tok.decode(rounds["c"][0]["outs"][0].token_ids))
    return dict(constrained=med["c"], free=med["f"], ratio=ratio, mask_share=share)


if __name__ == "__main__":
    main()
