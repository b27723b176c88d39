"""Tokenizer.from_gguf against transformers' GGUF tokenizer and against llama.cpp's pre-tokenizer rules, and the
IncrementalDecoder's streaming invariant (pieces concatenate to decode(all ids), no broken characters)."""

import json
import random

import pytest
import regex
from tokenizers import Tokenizer as HFBackend
from tokenizers import pre_tokenizers

from service.model import IncrementalDecoder, Tokenizer

from _model_fixtures import TEXTS, gguf_metadata, gguf_reader, hf_gguf_tokenizer, our_gguf_tokenizer

# llama.cpp's regexes for LLAMA_VOCAB_PRE_TYPE_SMOLLM (llama-vocab.cpp): numbers first, then GPT-2's pattern
_LLAMA_CPP_SMOLLM = (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")


def _regex_split(pieces, pattern):
    """llama.cpp's unicode_regex_split: every match is a piece, and so is the text between matches."""
    out = []
    for piece in pieces:
        pos = 0
        for m in regex.finditer(pattern, piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


@pytest.fixture(scope="module")
def hf():
    return hf_gguf_tokenizer()


@pytest.fixture(scope="module")
def ours():
    return our_gguf_tokenizer()


@pytest.fixture(scope="module")
def llama_cpp(hf):
    """An independent llama.cpp-style tokenizer: special tokens split out, the two regexes applied with the
    `regex` module, then each piece byte-level BPE'd by transformers' own model with no further splitting."""
    bpe = HFBackend.from_str(hf.backend_tokenizer.to_str())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    specials = [t for t in hf.get_vocab() if t.startswith("<") and hf.convert_tokens_to_ids(t) < 17]

    def encode(text):
        ids = []
        for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
            if part in specials:
                ids.append(hf.convert_tokens_to_ids(part))
                continue
            pieces = [part] if part else []
            for pattern in _LLAMA_CPP_SMOLLM:
                pieces = _regex_split(pieces, pattern)
            for piece in pieces:
                ids += bpe.encode(piece, add_special_tokens=False).ids
        return ids

    return encode


@pytest.fixture(scope="module")
def random_ids():
    rng = random.Random(0)
    return [[rng.randrange(49152) for _ in range(rng.randrange(1, 40))] for _ in range(40)] + [
        [0, 1, 2, 17, 3], list(range(0, 300, 7))]


def test_default_pre_tokenizer_is_transformers_exactly(hf):
    ours = our_gguf_tokenizer("default")
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text


def test_smollm_pre_tokenizer_is_llama_cpp(ours, llama_cpp):
    for text in TEXTS + ["x  12", "a\n\n3", "\t\t7", "x ٣ y", "１２３ fullwidth", "Ⅻ roman", "2²"]:
        assert ours.encode(text) == llama_cpp(text), text


def test_smollm_equals_transformers_except_before_numbers(ours, hf, llama_cpp):
    """transformers has no "smollm" entry and uses GPT-2's regex; the two agree on all text except where a
    run of whitespace precedes a number or a space precedes a non-ASCII numeric character (٣, ½, ²): llama.cpp
    (and SmolLM2's own tokenizer.json) isolate every numeric character first."""
    differing = [text for text in TEXTS if ours.encode(text) != hf(text)["input_ids"]]
    assert differing == [text for text in TEXTS if llama_cpp(text) != hf(text)["input_ids"]]
    assert differing == [TEXTS[8], TEXTS[12]]
    assert "½" in TEXTS[12] and "  42" in TEXTS[8]
    assert [ours.id_to_token(i) for i in ours.encode("x  12")] == ["x", "ĠĠ", "1", "2"]
    assert hf.convert_ids_to_tokens(hf("x  12")["input_ids"]) == ["x", "Ġ", "Ġ", "1", "2"]


def test_decode_matches_transformers(ours, hf, random_ids):
    for ids in [hf(text)["input_ids"] for text in TEXTS] + random_ids:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_round_trip_and_special_tokens_in_text(ours):
    for text in TEXTS:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids) == "user\nhi"


def test_special_token_properties_match_transformers(ours, hf):
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                         hf.pad_token_id)
    assert ours.special_tokens == {k: v for k, v in hf.special_tokens_map.items()
                                   if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    assert ours.vocab_size == len(hf) == 49152
    assert ours.eos_token_ids == {2}
    assert ours.with_eos_token_ids([0]).eos_token_ids == {0, 2}


def test_from_gguf_accepts_the_reader_itself(ours):
    from_reader = Tokenizer.from_gguf(gguf_reader())
    assert from_reader.encode(TEXTS[4]) == ours.encode(TEXTS[4])


def test_gguf_flags_and_unsupported_models():
    metadata = dict(gguf_metadata())
    with_bos = Tokenizer.from_gguf({**metadata, "tokenizer.ggml.add_bos_token": True,
                                    "tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.eot_token_id": 0})
    assert with_bos.encode("hi") == [1, with_bos.encode("hi", add_special_tokens=False)[0], 2]
    assert with_bos.eos_token_ids == {0, 2}
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.model": "llama"})
    with pytest.warns(UserWarning, match="'mystery'"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": "mystery"})


def _stream(tokenizer, ids, skip, prompt_ids=()):
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip, prompt_ids=prompt_ids)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_incremental_pieces_concatenate_to_decode(ours):
    held_back = 0
    for text in TEXTS:
        ids = ours.encode(text)
        for skip in (True, False):
            pieces = _stream(ours, ids, skip)
            assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in piece for piece in pieces), text  # never a cut character
        held_back += sum(piece == "" for piece in _stream(ours, ids, False)[:-1])
    assert held_back > 0  # emoji and CJK are cut between tokens here, so holding back was exercised


def test_incremental_pieces_with_invalid_utf8(ours, random_ids):
    """Random ids make invalid byte sequences; their U+FFFD still comes out, exactly as decode gives it, except
    at the very end, where a character still cut is dropped."""
    for ids in random_ids:
        for skip in (True, False):
            expected = ours.decode(ids, skip_special_tokens=skip).rstrip("\ufffd")
            assert "".join(_stream(ours, ids, skip)) == expected, ids


def test_a_character_cut_by_the_end_of_the_sequence_is_dropped(ours):
    """`max_tokens` reached between the tokens of one character: vLLM never emits the piece (no U+FFFD)."""
    ids = ours.encode("ok 🙃🙂")
    whole = next(n for n in range(1, len(ids)) if ours.decode(ids[:n]).endswith("🙃"))
    cut = ids[:whole + 1]                              # 🙂's first byte token(s) only
    assert ours.decode(cut).endswith("\ufffd")         # what a plain decode shows
    pieces = _stream(ours, cut, True)
    assert "".join(pieces) == "ok 🙃" and not any("\ufffd" in piece for piece in pieces)


def test_incremental_with_prompt_context(ours):
    prompt = ours.encode("<|im_start|>assistant\n")
    for text in TEXTS:
        ids = ours.encode(text)
        assert "".join(_stream(ours, ids, True, prompt_ids=prompt)) == ours.decode(ids), text


def test_emoji_is_emitted_whole(ours):
    ids = ours.encode("👨‍👩‍👧")
    pieces = _stream(ours, ids, True)
    assert [p for p in pieces if p] and all(not p or p.isprintable() or "\u200d" in p for p in pieces)
    assert "".join(pieces) == "👨‍👩‍👧"
    assert len(ids) > len([p for p in pieces if p])  # several tokens per character were held and joined


def _sentencepiece_style() -> Tokenizer:
    """A Llama-2 / Mistral-style tokenizer (metaspace with a prepended "▁", byte fallback, the decoder stripping
    one leading space), trained here on a little text."""
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, trainers

    text = "the cat sat on the mat and the dog ate the hat " * 20
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_side = Backend(models.BPE())
    trainer_side.normalizer = normalizer
    trainer_side.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer_side.train_from_iterator([text], trainers.BpeTrainer(vocab_size=120, show_progress=False))
    trained = json.loads(trainer_side.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def test_a_sentencepiece_words_leading_space_needs_the_prompts_context():
    """What the service's streams pass (`prompt_ids`, a probe found them unpassed): the first generated word
    keeps its space, as decode(prompt + output) minus decode(prompt) has it (vLLM's and TGI's detokenizers)."""
    tok = _sentencepiece_style()
    prompt, output = tok.encode("the cat", add_special_tokens=False), tok.encode("sat on", add_special_tokens=False)
    expected = tok.decode(prompt + output)[len(tok.decode(prompt)):]
    assert expected == " sat on"
    assert "".join(_stream(tok, output, True, prompt_ids=prompt)) == expected
    assert "".join(_stream(tok, output, True)) == "sat on"            # without it the space is lost
