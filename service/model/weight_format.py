"""The `weight_format` setting: in which form the base model's weights are served, and converting them.

- `gguf`: a GGUF's weights stay in their stored blocks (Q4_1, Q8_0, Q4_K, ... as llama.cpp serves them);
- `bf16` / `int8` / `fp32`: dense weights converted at load (bf16: half of fp32's bytes; int8: weight-only,
  one scale per output row) or kept fp32, all served by the same CPU kernel with fp32 activations;
- `dense`: plain torch layers in the `dtype` setting (bf16 with oneDNN prepacking where the CPU has
  AVX512-BF16 or AMX; the path for GPUs);
- `auto`: `gguf` for a GGUF file on the CPU with the kernel built, `dense` otherwise (a Hugging Face
  checkpoint keeps its exact dense weights unless `bf16` / `int8` is asked for: on an AVX2-only CPU,
  `bf16` halves the bytes a decode step reads, since bf16 -> fp32 costs a shift).
Adapters are unaffected: they keep their own dtype on top of any format (fp32 on stored formats).
"""

from __future__ import annotations

import logging
import torch

from .loaded import LoadedModel
from .quant_formats import KERNEL_COLUMN_MULTIPLE, from_dense

log = logging.getLogger("adapter_serve")

WEIGHT_FORMATS = ("auto", "dense", "fp32", "bf16", "int8", "gguf")
_STORED = {"fp32": "F32", "bf16": "BF16", "int8": "I8"}
_LINEAR_SUFFIXES = ("_proj.weight", "lm_head.weight", "embed_tokens.weight")


def resolve_weight_format(setting: str, gguf_model: bool, device: torch.device) -> str:
    """The format `setting` means for this model and device (never "auto")."""
    if setting not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}; got {setting!r}")
    if setting == "dense":
        return "dense"
    from .quant_linear import kernel

    usable = device.type == "cpu" and kernel() is not None
    if setting == "auto":
        return "gguf" if usable and gguf_model else "dense"
    if device.type != "cpu":
        raise ValueError(f"weight_format {setting!r} is served by the CPU kernel; on {device.type} use dense")
    if setting == "gguf" and not gguf_model:
        raise ValueError("weight_format 'gguf' needs a GGUF model file")
    if not usable:
        log.warning("weight_format %s: the CPU kernel is unavailable (no C++ compiler?); the weights are "
                    "dequantised to fp32 and served by torch", setting)
    return setting


def store_weights(loaded: LoadedModel, fmt: str) -> LoadedModel:
    """Move `loaded`'s dense linear and embedding weights into format `fmt` (fp32 / bf16 / int8); for "gguf"
    and "dense" nothing changes. Returns `loaded`, changed in place."""
    target = _STORED.get(fmt)
    if target is None:
        return loaded
    for key in [k for k in loaded.state_dict if k.endswith(_LINEAR_SUFFIXES)]:
        weight = loaded.state_dict[key]
        if weight.dim() == 2 and weight.shape[1] % KERNEL_COLUMN_MULTIPLE == 0:
            loaded.stored[key] = from_dense(weight, target)
            del loaded.state_dict[key]
    return loaded


def stored_bytes(loaded: LoadedModel) -> int:
    """Bytes of the stored weights."""
    return sum(w.nbytes for w in loaded.stored.values())


def weights_summary(loaded: LoadedModel, fmt: str, dtype: torch.dtype) -> dict:
    """What the base model is served as, for `/info`, `/stats`, the metrics and the start-up line: the format,
    and the tensors per form (stored ones by their block format, e.g. "Q4_1"; the rest "dense <dtype>": norms,
    and whatever a stored format does not take), with the stored bytes."""
    types: dict[str, int] = {}
    for weight in loaded.stored.values():
        types[weight.format] = types.get(weight.format, 0) + 1
    dense = f"dense {str(dtype).removeprefix('torch.')}"
    if loaded.state_dict:
        types[dense] = len(loaded.state_dict)
    return {"weight_format": fmt, "weight_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
            "stored_bytes": stored_bytes(loaded)}


def describe(summary: dict) -> str:
    """The summary as one line: "gguf: Q4_1 x 168, dense float32 x 61, Q6_K x 1 (85 MiB stored)"."""
    types = ", ".join(f"{name} x {count}" for name, count in summary["weight_types"].items())
    stored = f" ({summary['stored_bytes'] / 2**20:.0f} MiB stored)" if summary["stored_bytes"] else ""
    return f"{summary['weight_format']}: {types}{stored}"
