"""Which device the base model runs on: the `device` setting (`auto`, `cpu`, `cuda`, `cuda:N`) resolved once
at start-up, with an error that names the setting when it cannot be served here.

`auto` is the first CUDA GPU when torch sees one, else the CPU. `cuda` / `cuda:N` on a machine where torch
has no usable CUDA device (a CPU build of torch, no driver, no GPU visible, N out of range) is refused here
rather than failing later inside a `.to()` with torch's own message. The device then decides the rest: on
CUDA the weights are dense (`weight_format` auto -> dense; the stored formats are served by the CPU kernel),
the dtype defaults to bf16, the C++ CPU kernels are neither built nor called (each of their gates checks
`is_cpu`), and the Triton kernels (`cuda_ops.py`, `adapters_core/cuda_lora.py`) serve decode attention and
the LoRA deltas.
"""

from __future__ import annotations

import torch


def resolve_device(setting: str) -> torch.device:
    """The torch device `setting` names on this machine; ValueError naming the setting when it cannot run here."""
    name = (setting or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {setting!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {setting!r}")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"device {setting!r}: torch {torch.__version__} ({build}) sees no usable CUDA device "
                         "here; use device auto or cpu, or install a CUDA build of torch on a GPU host")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ValueError(f"device {setting!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)
