"""`AdapterDtype`: the `adapter_dtype` setting (vLLM's `--lora-dtype`) as the registry applies it.

`auto` holds an adapter as its checkpoint stores it (and a dense base model casts it to its own dtype, as PEFT
does): exactly what the service did before the setting existed. `float32` / `bfloat16` / `float16` cast the
tensors of the low-rank products (LoRA and AdaLoRA A, B, E, LoRA B's bias; `adapters_core.packing`'s
`is_factor_tensor`) once, in the copy the loader makes anyway (`pack_adapter_tensors`) or right after an upload
is validated, and the model then holds them in that dtype whatever its own (`load_adapter(factor_dtype=...)`).
IA3 vectors, DoRA magnitudes, `modules_to_save` copies and prompt-learning embeddings stay as stored: they
multiply or replace whole activations, and are too few bytes to be worth rounding. The files in the store are
never rewritten. The bytes an adapter takes in the cpu and device tiers (the memory budget and the
`adapter_serve_adapter_bytes` metric) are its stored size with the weights counted in the dtype they are held in.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from adapters_core.packing import cast_factor_tensors, pack_adapter_tensors, tensor_bytes

from .errors import Invalid
from .validation import check_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterDtype:
    """`setting` ("auto" or a key of DTYPES) and `factor_dtype` (None for auto)."""

    def __init__(self, setting: str = "auto"):
        if setting != "auto" and setting not in DTYPES:
            raise ValueError(f"adapter_dtype must be one of auto, {', '.join(DTYPES)}; got {setting!r}")
        self.setting = setting
        self.factor_dtype: Optional[torch.dtype] = DTYPES.get(setting)

    def hold(self, tensors: dict[str, torch.Tensor], weights_name: str,
             pack: bool) -> tuple[dict[str, torch.Tensor], int]:
        """Worker thread: `tensors` as read from the files -> (the tensors to hold: factors cast, packed as the
        stacks read them when `pack`; how many bytes more they take than the file's weights, negative when
        fewer). A packed buffer is checked finite (the load's one check); so are cast ones, Invalid naming the
        setting when a value was finite before the cast and is not after it (beyond float16's range)."""
        if pack:
            held = pack_adapter_tensors(tensors, self.factor_dtype)
        else:
            held = cast_factor_tensors(tensors, self.factor_dtype)
        if pack or held is not tensors:
            self._check(lambda: tensors, held, weights_name)
        return held, tensor_bytes(held) - tensor_bytes(tensors)

    def hold_packed(self, held: dict[str, torch.Tensor], file_bytes: int, nonfinite: Optional[list[str]],
                    read_stored: Callable[[], dict[str, torch.Tensor]],
                    weights_name: str) -> tuple[dict[str, torch.Tensor], int]:
        """Worker thread: what `hold(..., pack=True)` gives, for tensors read packed straight from the file with
        `factor_dtype` (`read_packed_safetensors`, which also says the file's weight bytes and, where its read
        checked them, which tensors are not finite: an empty list spares the check's pass over the buffers);
        `read_stored()` reads the file's own tensors, only to name a fault."""
        if nonfinite is None or nonfinite:
            self._check(read_stored, held, weights_name)     # (a fault is named by the check's own search)
        return held, tensor_bytes(held) - file_bytes

    def _check(self, stored: Callable[[], dict[str, torch.Tensor]], held: dict[str, torch.Tensor],
               weights_name: str) -> None:
        try:
            check_tensors(held, weights_name)
        except Invalid:
            if self.factor_dtype is None:
                raise
            check_tensors(stored(), weights_name)          # not finite in the file itself: that error
            key = next(k for k, t in held.items() if not bool(torch.isfinite(t).all()))
            raise Invalid(f"{weights_name}: tensor {key!r} holds values beyond the range of {self.setting}, the "
                          f"dtype this server holds adapters in (adapter_dtype); serve it with another "
                          f"adapter_dtype") from None


def held_dtype(tensors: Optional[dict[str, torch.Tensor]]) -> Optional[str]:
    """The dtype most of an adapter's bytes are held in ("bfloat16", ...), as the admin routes show it."""
    by_dtype: dict[torch.dtype, int] = {}
    for t in (tensors or {}).values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
    return str(max(by_dtype, key=by_dtype.get)).removeprefix("torch.") if by_dtype else None
