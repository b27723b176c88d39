"""`for_llguidance`: the tokenizer.json llguidance reads, with the added tokens that are not special made plain.

llguidance 1.9 counts every entry of `added_tokens` as a special token (`is_special_token`), whatever its
`special` flag, and shows it as `"\\ufffd[id]"`; yet its tokenisation of forced text goes through the tokenizer,
which turns `<tool_call>` into that one added id. So a grammar whose output holds a non-special added token
(Qwen2.5's `<tool_call>` / `<think>`, Mistral's `[TOOL_CALLS]`-style tags added with `special: false`) failed
every time with "token ... doesn't satisfy the grammar". For a byte-level BPE (GPT-2's, Llama 3's, Qwen2's) such
tokens move from `added_tokens` into the model's vocabulary under their own ids, each UTF-8 byte spelled as
GPT-2's printable stand-in, so llguidance sees ordinary tokens with those bytes, which the grammar's lexer matches
byte by byte. Other tokenizers pass unchanged: for a metaspace BPE with byte fallback (Llama 2's, Mistral's) the
same move shifted llguidance's ids of the added tokens by one, so it is not made (such tags stay unusable inside
a grammar there, as before).
"""

from __future__ import annotations

import json

from service.model.tokenizer import bytes_to_unicode


def for_llguidance(tokenizer_json: str) -> str:
    data = json.loads(tokenizer_json)
    model, added = data.get("model") or {}, data.get("added_tokens") or []
    vocab = model.get("vocab")
    plain = [t for t in added if not t.get("special") and isinstance(t.get("content"), str) and t["content"]]
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not plain or not _byte_level(data):
        return tokenizer_json
    table = bytes_to_unicode()
    for token in plain:
        piece = "".join(table[b] for b in token["content"].encode("utf-8"))
        if vocab.get(piece, token["id"]) != token["id"]:      # the vocabulary has these bytes under another id
            continue
        vocab[piece] = token["id"]
        added.remove(token)
    return json.dumps(data, ensure_ascii=False)


def _byte_level(data: dict) -> bool:
    def kinds(part) -> list:
        if not isinstance(part, dict):
            return []
        if part.get("type") == "Sequence":
            return [k for p in part.get("decoders") or part.get("pretokenizers") or [] for k in kinds(p)]
        return [part.get("type")]

    return "ByteLevel" in kinds(data.get("decoder")) + kinds(data.get("pre_tokenizer"))
