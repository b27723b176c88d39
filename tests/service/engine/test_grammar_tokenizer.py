"""Grammars over a byte-level BPE with added tokens that are not special (Qwen2.5's `<tool_call>`, `<think>`):
llguidance counted them special and every grammar whose output held one failed ("token ... doesn't satisfy the
grammar"); `grammar_tokenizer.for_llguidance` makes them ordinary tokens, with the same ids and bytes."""
import json

from tokenizers import AddedToken, Tokenizer as Backend

from service.engine import Constraint
from service.engine.grammar_tokenizer import for_llguidance
from service.engine.structured import Grammars
from service.model import Tokenizer
from service.model.gguf_file import read_gguf
from service.model.gguf_loader import default_model_path


def our_gguf_tokenizer() -> Tokenizer:
    """The embedded SmolLM2's byte-level BPE."""
    return Tokenizer.from_gguf(read_gguf(default_model_path())[0])


def _with_tags() -> Tokenizer:
    base = our_gguf_tokenizer()
    backend = Backend.from_str(base.backend.to_str())
    backend.add_tokens([AddedToken("<tool_call>", special=False, normalized=False),
                        AddedToken("<think> ok", special=False, normalized=False)])
    return Tokenizer(backend, eos_token=base.eos_token)


def test_a_grammar_holding_an_added_plain_token_accepts_the_tokenizers_id():
    tok = _with_tags()
    tag = tok.encode("<tool_call>", add_special_tokens=False)
    assert len(tag) == 1                                          # the tokenizer's one added id
    vocab = tok.backend.get_vocab_size(with_added_tokens=True)
    grammars = Grammars(tok, vocab, tok.eos_token_ids)
    matcher = grammars.compile(Constraint.regex("<tool_call>\\{\\}", "guided_regex")).deep_copy()
    assert matcher.consume_token(tag[0]), matcher.get_error()
    assert not grammars.tokenizer.is_special_token(tag[0])
    spaced = tok.encode("<think> ok", add_special_tokens=False)
    assert len(spaced) == 1 and grammars.tokenizer.decode_bytes(spaced) == b"<think> ok"
    for i in range(0, vocab, 997):                                 # every other id keeps its bytes
        assert grammars.tokenizer.decode_bytes([i]) == tok.backend.decode([i], skip_special_tokens=False).encode(
            "utf-8") or tok.backend.id_to_token(i).startswith("<|")


def test_special_tokens_and_other_tokenizers_pass_unchanged():
    text = _with_tags().backend.to_str()
    moved = json.loads(for_llguidance(text))
    assert [t["content"] for t in moved["added_tokens"]] == [t["content"] for t in json.loads(text)["added_tokens"]
                                                             if t["special"]]
    plain = our_gguf_tokenizer().backend.to_str()
    assert for_llguidance(plain) == plain or all(t["special"] for t in json.loads(plain)["added_tokens"])


def test_a_tokenizer_the_grammar_engine_cannot_read_is_named_at_start():
    """A WordPiece folder failed deep inside llguidance with "can't determine decoder type" and a long traceback."""
    import pytest
    from tokenizers import decoders, models

    backend = Backend(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2, "[SEP]": 3}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match=r"the model's tokenizer \(WordPiece, 4 ids, end-of-sequence \[3\]\) cannot "
                                         r"be used by the grammar engine"):
        Grammars(Tokenizer(backend, eos_token="[SEP]"), 4, [3])
