"""PEFT prompt-learning adapters (prompt tuning, P-tuning with MLP / LSTM, prefix tuning with and without
projection) made and saved by peft itself with random encoder weights, and the oracle the reference
prescribes: `PeftModel.from_pretrained` and a greedy loop over its forward (peft 0.21's `generate` is broken
for these methods with transformers 5.x). Shared by the compat, engine and HTTP tests."""
from __future__ import annotations

import copy
import warnings

import peft
import torch

NVT = 5
KINDS = {
    "prompt": lambda im, n: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, inference_mode=im),
    "ptuning_mlp": lambda im, n: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                          encoder_hidden_size=24, inference_mode=im),
    "ptuning_lstm": lambda im, n: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                           encoder_reparameterization_type="LSTM",
                                                           encoder_num_layers=2, encoder_hidden_size=12,
                                                           inference_mode=im),
    "prefix": lambda im, n: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, inference_mode=im),
    "prefix_proj": lambda im, n: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                         prefix_projection=True, encoder_hidden_size=20,
                                                         inference_mode=im),
}


@torch.no_grad()
def make_prompt_adapter(base, kind: str, inference_mode: bool, directory, seed: int = 0, num_virtual_tokens: int = NVT,
                        std: float = 0.5):
    """Wrap a copy of `base` with PEFT, give the encoder random weights (N(0, std)), save it to `directory`;
    returns the PEFT model (eval)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), KINDS[kind](inference_mode, num_virtual_tokens))
    g = torch.Generator().manual_seed(seed)
    for p in pm.prompt_encoder["default"].parameters():
        p.copy_(std * torch.randn(p.shape, generator=g))
    pm.eval()
    pm.save_pretrained(str(directory))
    return pm


def peft_reference(base, directory):
    """What a PEFT user serves: the saved folder loaded on a copy of `base`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


@torch.no_grad()
def peft_logits(pm, ids: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pm(input_ids=ids).logits.float()


@torch.no_grad()
def greedy(logits_fn, ids: torch.Tensor, steps: int = 16) -> list[list[int]]:
    """Greedy continuation by full recomputation: seq = cat(seq, argmax(logits_fn(seq)[:, -1]))."""
    seq = ids
    for _ in range(steps):
        seq = torch.cat([seq, logits_fn(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:].tolist()
