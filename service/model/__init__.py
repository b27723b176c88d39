"""The served base model: its config, loaders (Hugging Face folder or hub id, GGUF), tokenizer and chat template.

`load_model(spec)` returns a `LoadedModel` (config, a state dict in transformers' Llama key layout, the
tokenizer, the chat template, the generation config), which the decoder and the engine build on.
"""

from .chat_template import ChatTemplateError, render_chat
from .config import ModelConfig
from .gguf_loader import default_model_path, load_gguf
from .hf_loader import load_hf_folder, load_hub
from .loaded import LoadedModel, check_state_dict, check_vocab, expected_shapes
from .loader import load_model
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "ChatTemplateError", "IncrementalDecoder", "LoadedModel", "ModelConfig", "Tokenizer", "check_state_dict",
    "check_vocab", "default_model_path", "expected_shapes", "load_gguf", "load_hf_folder", "load_hub",
    "load_model", "render_chat",
]
