"""Which grammar library to constrain decoding with: llguidance, xgrammar and outlines-core on this CPU.

Each library gets SmolLM2-135M's tokenizer (49,152 tokens, from the embedded GGUF) and one JSON schema (an
object with a string, a bounded integer, an enum, an array of strings, a boolean and a nested object, all
required, no extra properties). 16 sequences run side by side as in one engine batch: each follows its own
valid document (compact JSON in the schema's property order, tokenised by the tokenizer, then EOS), and every
step computes the 16 token masks (int32 bitmasks, one bit per token, what each library writes natively) and
then advances each sequence by its next token. Printed per library: the tokenizer set-up, the schema's cold
compile (nothing cached), the mask time per step for the 16 sequences (median and p90 over the steps of
`--rounds` rounds, the libraries interleaved round by round), the token-advance time per step, and whether
every document token was allowed by its mask (a library that forbade one would fail the requests). Libraries
that are not installed are reported as such; the project depends on one of them only
(`pip install llguidance xgrammar outlines-core` for the comparison). Usage:
    .venv/bin/python bench/grammar_library_eval.py [--rounds 5] [--sequences 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service.model import load_model  # noqa: E402
from service.model.tokenizer import bytes_to_unicode  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "active": {"type": "boolean"},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "tags", "active", "address"],
    "additionalProperties": False,
}
NAMES = ["Alice", "Bob", "Chandra", "Dmitri", "Eve Li", "Farouk", "Gina", "Hiro Tanaka"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "New York", "Oslo"]


def documents(n: int) -> list[str]:
    docs = []
    for i in range(n):
        doc = {"name": NAMES[i % len(NAMES)], "age": 17 + 7 * i, "color": ["red", "green", "blue"][i % 3],
               "tags": ["t%d" % j for j in range(i % 4)], "active": i % 2 == 0,
               "address": {"city": CITIES[i % len(CITIES)], "zip": "%05d" % (10007 * i % 100000)}}
        docs.append(json.dumps(doc, separators=(",", ":")))
    return docs


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes (byte-level BPE spelling undone; special tokens as their text)."""
    decode = {c: b for b, c in bytes_to_unicode().items()}
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    out = [b""] * (max(vocab.values()) + 1)
    special = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    for token, i in vocab.items():
        out[i] = token.encode() if token in special else bytes(decode[c] for c in token)
    return out


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos: list[int], parallel: bool):
        import llguidance
        import llguidance.numpy
        self.lib, self.np, self.parallel = llguidance, llguidance.numpy, parallel
        self.name += " (LLExecutor)" if parallel else " (one by one)"
        self.tok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor() if parallel else None

    def compile(self, schema: dict):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema)
        error = self.lib.LLMatcher.validate_grammar(grammar, self.tok)
        assert not error, error
        return grammar

    def matcher(self, compiled):
        return self.lib.LLMatcher(self.tok, compiled)

    def fill(self, matchers, bitmask):
        if self.parallel:
            self.np.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        else:
            for i, m in enumerate(matchers):
                self.np.fill_next_token_bitmask(m, bitmask, i)

    def advance(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos: list[int], parallel: bool):
        import xgrammar
        self.lib, self.parallel = xgrammar, parallel
        self.name += " (BatchGrammarMatcher)" if parallel else " (one by one)"
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        encoded = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            encoded[i] = token
        self.info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                           stop_token_ids=eos)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=os.cpu_count()) if parallel else None

    def compile(self, schema: dict):
        compiler = self.lib.GrammarCompiler(self.info, max_threads=os.cpu_count(), cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)

    def matcher(self, compiled):
        return self.lib.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask):
        if self.parallel:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        else:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)

    def advance(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size: int, eos: list[int], parallel: bool):
        import outlines_core
        self.lib = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tokenizer)):
            if i not in eos and b:
                by_bytes.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos[0], by_bytes)
        self.eos = eos[0]

    def compile(self, schema: dict):
        regex = self.lib.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.lib.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.lib.Guide(compiled)

    def fill(self, matchers, bitmask):
        row = bitmask.shape[1]
        for i, m in enumerate(matchers):
            m.write_mask_into(bitmask[i].ctypes.data, row, 4)

    def advance(self, guide, token: int) -> bool:
        if token == self.eos and guide.is_finished():    # its mask allows EOS there; advancing past it raises
            return True
        try:
            guide.advance(token, return_tokens=False)
            return True
        except Exception:
            return False


def allowed(bitmask: np.ndarray, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def run_round(lib, compiled, sequences: list[list[int]], vocab_size: int) -> tuple[list[float], list[float], int]:
    """One pass of all sequences: (mask seconds per step, advance seconds per step, forbidden tokens)."""
    bitmask = np.zeros((len(sequences), (vocab_size + 31) // 32), dtype=np.int32)
    matchers = [lib.matcher(compiled) for _ in sequences]
    masks, advances, forbidden = [], [], 0
    for step in range(max(len(s) for s in sequences)):
        live = [(i, s[step]) for i, s in enumerate(sequences) if step < len(s)]
        active = [matchers[i] for i, _ in live]
        start = time.perf_counter()
        lib.fill(active, bitmask)
        masks.append(time.perf_counter() - start)
        start = time.perf_counter()
        for row, (i, token) in enumerate(live):
            forbidden += not allowed(bitmask, row, token)
            if not lib.advance(matchers[i], token):
                forbidden += 1
        advances.append(time.perf_counter() - start)
    return masks, advances, forbidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sequences", type=int, default=16)
    args = parser.parse_args()
    loaded = load_model(None)
    tokenizer, vocab_size = loaded.tokenizer, loaded.config.vocab_size
    eos = sorted(tokenizer.eos_token_ids)
    sequences = [tokenizer.encode(d, add_special_tokens=False) + eos[:1] for d in documents(args.sequences)]
    print(f"SmolLM2 tokenizer ({vocab_size} tokens), {args.sequences} sequences of {min(map(len, sequences))}-"
          f"{max(map(len, sequences))} tokens (EOS included), {args.rounds} rounds; {os.cpu_count()} CPUs")
    libs, results = [], {}
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        for parallel in ((False, True) if cls is not OutlinesCore else (False,)):
            try:
                start = time.perf_counter()
                lib = cls(tokenizer, vocab_size, eos, parallel)
                setup = time.perf_counter() - start
            except ImportError as exc:
                print(f"{cls.name}: not installed ({exc})")
                break
            start = time.perf_counter()
            compiled = lib.compile(SCHEMA)
            compile_s = time.perf_counter() - start
            libs.append((lib, compiled))
            results[lib.name] = dict(setup=setup, compile=compile_s, masks=[], advances=[], forbidden=0)
    for _ in range(args.rounds):
        for lib, compiled in libs:                  # interleaved: a busy moment hits every library alike
            masks, advances, forbidden = run_round(lib, compiled, sequences, vocab_size)
            r = results[lib.name]
            r["masks"] += masks
            r["advances"] += advances
            r["forbidden"] += forbidden
    print(f"{'library':36} {'tokenizer s':>11} {'compile ms':>10} {'mask ms/step':>12} {'p90':>7} "
          f"{'advance ms':>10} {'forbidden':>9}")
    for name, r in results.items():
        masks = sorted(r["masks"])
        print(f"{name:36} {r['setup']:11.2f} {r['compile'] * 1e3:10.1f} {statistics.median(masks) * 1e3:12.3f} "
              f"{masks[int(0.9 * len(masks))] * 1e3:7.3f} {statistics.median(r['advances']) * 1e3:10.3f} "
              f"{r['forbidden']:9d}")


if __name__ == "__main__":
    main()
