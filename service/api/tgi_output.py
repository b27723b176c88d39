"""TGI / LoRAX response shapes, as `text-generation`, `lorax-client` and `huggingface_hub.InferenceClient` parse
them: tokens `{id, text, logprob, special}` (plus LoRAX's `skipped` and, when asked, `alternative_tokens`),
`details` with `finish_reason` (`length`, `eos_token`, `stop_sequence`), `generated_tokens`, `prompt_tokens`,
`skipped_tokens`, `seed`, `prefill` (with `decoder_input_details`, each prompt token `{id, text, logprob}`, the
first one's logprob null, as TGI) and `tokens` (and `top_tokens` when `top_n_tokens` asks), stream events
`{index, token, top_tokens, generated_text, details}` whose last one carries the text and the details,
`best_of_sequences` for the sequences `best_of` did not choose, and `/info`. The EOS token that ends a
sequence is its last token, marked special, as in TGI; its text is not part of `generated_text`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from service.generation import Piece
from service.model.tokenizer import IncrementalDecoder

from .logprobs import finite
from .tgi_params import MAX_BEST_OF, Parameters

VERSION = "0.1.0"


class Output:
    """One sequence's tokens as they come, and its details at the end."""

    def __init__(self, state, p: Parameters, inputs: str, prompt_tokens: int, seed: Optional[int],
                 prompt_ids: Sequence[int] = ()):
        self.tokenizer, self.p, self.inputs = state.loaded.tokenizer, p, inputs
        self.prompt_tokens, self.seed, self.prompt_ids = prompt_tokens, seed, prompt_ids
        self.prefill: list[dict[str, Any]] = []       # decoder_input_details: the prompt tokens
        self.tokens: list[dict[str, Any]] = []
        self.top_tokens: list[list[dict[str, Any]]] = []
        self.text: list[str] = []
        self.finish_reason: Optional[str] = None
        # each token's own text, as TGI reports it (the pieces' text is what the stop strings let through, so a
        # token that starts a possible stop sequence would show "" and the one completing it the held text)
        self.decoder = IncrementalDecoder(self.tokenizer, prompt_ids=prompt_ids or ())

    def _token(self, token_id: int, text: str, logprob: Optional[float], special: bool = False) -> dict[str, Any]:
        return {"id": token_id, "text": text, "logprob": logprob, "special": special, "skipped": False}

    def _alternatives(self, top) -> list[dict[str, Any]]:
        return [self._token(i, self.tokenizer.decode([i], False), lp, i in self.tokenizer.eos_token_ids)
                for i, lp in top or []]

    def add(self, piece: Piece) -> Optional[dict[str, Any]]:
        """Take a piece; the token it adds (or None: it only ends the sequence or carries held-back text)."""
        self.text.append(piece.text)
        if piece.prompt_logprobs is not None:
            self.prefill = [{"id": i, "text": self.tokenizer.decode([i], False), "logprob": finite(entry[0]) if entry else None}
                            for i, entry in zip(self.prompt_ids, piece.prompt_logprobs)]
        token = None
        if piece.token_id is not None:
            token = self._token(piece.token_id, self.decoder.push(piece.token_id), piece.logprob)
        elif piece.finish_reason and self.tokens:    # a character the decoder held until the end: the last token's
            self.tokens[-1]["text"] += self.decoder.flush()
        if piece.token_id is None and piece.stop_token is not None:     # the EOS (or stop) token that ended it
            token_id, logprob, top = piece.stop_token
            token = self._token(token_id, self.tokenizer.decode([token_id], False), logprob, special=True)
            piece = dataclasses.replace(piece, top_logprobs=top)          # its alternatives, below
        if piece.finish_reason:
            self.finish_reason = ("length" if piece.finish_reason == "length" else
                                  "eos_token" if piece.stop_token is not None else "stop_sequence")
        if token is not None:
            if self.p.return_k_alternatives:
                token["alternative_tokens"] = self._alternatives(piece.top_logprobs)
            if self.p.top_n_tokens:
                self.top_tokens.append(self._alternatives(piece.top_logprobs))
            self.tokens.append(token)
        return token

    @property
    def generated_text(self) -> str:
        text = "".join(self.text)
        return self.inputs + text if self.p.return_full_text else text

    def details(self, stream: bool = False) -> dict[str, Any]:
        out = {"finish_reason": self.finish_reason, "generated_tokens": len(self.tokens), "seed": self.seed,
               "prompt_tokens": self.prompt_tokens, "input_length": self.prompt_tokens}
        if not stream:
            out.update(skipped_tokens=0, prefill=self.prefill, tokens=self.tokens)
            if self.p.top_n_tokens:
                out["top_tokens"] = self.top_tokens
        return out

    @property
    def mean_logprob(self) -> float:
        """What best_of ranks sequences by, as TGI: their tokens' mean log-probability."""
        logprobs = [t["logprob"] for t in self.tokens if t["logprob"] is not None]
        return sum(logprobs) / len(logprobs) if logprobs else float("-inf")

    def best_of_sequence(self) -> dict[str, Any]:
        """This sequence as one of `details.best_of_sequences`."""
        out = {"generated_text": self.generated_text, "finish_reason": self.finish_reason,
               "generated_tokens": len(self.tokens), "seed": self.seed, "prefill": self.prefill, "tokens": self.tokens}
        if self.p.top_n_tokens:
            out["top_tokens"] = self.top_tokens
        return out

    def event(self, token: dict[str, Any], final: bool) -> dict[str, Any]:
        """A stream event for `token` (the last one carries the text and the details)."""
        return {"index": len(self.tokens), "token": token,
                "top_tokens": self.top_tokens[-1] if self.p.top_n_tokens and self.top_tokens else None,
                "generated_text": self.generated_text if final else None,
                "details": self.details(stream=True) if final else None}


def info(state) -> dict[str, Any]:
    """`GET /info` with TGI's fields and LoRAX's, from this server's settings."""
    s, model = state.settings, state.engine.model
    param = next(model.parameters(), None)
    return {
        "model_id": state.model_id, "model_sha": None,
        "model_dtype": str(param.dtype) if param is not None else "unknown",
        "model_device_type": param.device.type if param is not None else "cpu",
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": s.max_batch_size + s.max_waiting, "max_best_of": MAX_BEST_OF,
        "max_stop_sequences": 16,
        "max_input_length": s.max_prompt_tokens, "max_input_tokens": s.max_prompt_tokens,
        "max_total_tokens": s.max_seq_len, "max_batch_total_tokens": s.max_batch_size * s.max_seq_len,
        "max_batch_prefill_tokens": s.max_batch_tokens, "max_batch_size": s.max_batch_size,
        "max_waiting_tokens": 0, "waiting_served_ratio": 0.0, "validation_workers": 1, "max_client_batch_size": 1,
        "router": "adapter-serving", "version": VERSION, "sha": None, "docker_label": None,
        # LoRAX
        "max_active_adapters": s.max_device_adapters, "adapter_sources": ["hub", "local"],
        "preloaded_adapters": list(s.preload_adapters), "eager_prefill": False, "request_logger_url": None,
        "supports_generation": True, "supports_embeddings": False, "supports_classification": False,
        # ours: what the base is served as (`model_dtype` is the compute dtype; a GGUF's blocks are not it)
        "weight_format": state.weights.get("weight_format"), "weight_types": state.weights.get("weight_types"),
    }
