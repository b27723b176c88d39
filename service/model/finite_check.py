"""`check_finite_dense` / `check_finite_stored`: a base model whose weights hold NaN or inf is refused at start.

Such a model would start, answer `/ready`, and then fail every request with "the model produced non-finite
logits". Dense tensors are checked whole when the model is loaded (a pass over their bytes: ~1 ms for
SmolLM2's norms, ~0.1 s a GB). Weights kept in a stored block format are not dequantised for this (1.3 s for
SmolLM2's 92 MiB of blocks, a minute for a 7B model): one forward of a few tokens probes them, since every
value of a linear weight reaches every token's output (and a tied head reads every embedding row); only when
its logits are not finite are the stored weights dequantised one by one to name the tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from .loaded import LoadedModel
from .quant_formats import dequantize

PROBE_TOKENS = 8


def _bad(name: str, values: torch.Tensor) -> Optional[str]:
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return None
    return f"{name} has {int((~finite).sum())} NaN or infinite value(s) of {values.numel()}"


def check_finite_dense(loaded: LoadedModel, source: str) -> None:
    """ValueError naming the first dense floating-point tensor of `loaded` that is not finite."""
    for name, tensor in loaded.state_dict.items():
        if tensor.is_floating_point():
            problem = _bad(name, tensor)
            if problem:
                raise ValueError(f"{source}: the model's weights are not finite: {problem}")


@torch.no_grad()
def check_finite_stored(loaded: LoadedModel, model: torch.nn.Module, source: str) -> None:
    """With stored weights, one forward of a few tokens through `model` (a `Decoder`); non-finite logits:
    ValueError naming the stored tensor that holds the value (or saying none does)."""
    if not loaded.stored:
        return
    ids = torch.arange(min(PROBE_TOKENS, loaded.config.vocab_size))[None]          # [1, S]
    if bool(torch.isfinite(model(ids)).all()):
        return
    for name, weight in loaded.stored.items():
        problem = _bad(name, dequantize(weight))
        if problem:
            raise ValueError(f"{source}: the model's weights are not finite: {problem}")
    raise ValueError(f"{source}: the model gives non-finite logits for the tokens {ids[0].tolist()} although "
                     "every weight is finite (an overflow in its activations?)")
