"""Adapters on the GPU equal PEFT: our decoder with LoRA (ranks 4-16, rsLoRA, alpha 8-32), DoRA and IA3
adapters loaded from PEFT's folders, one adapter per row of a mixed batch beside base rows, against PEFT's
model holding that adapter alone on the same device. fp32 to 1e-4; bf16 within its rounding. The plain LoRA
layers take the Triton SGMV kernels on CUDA (counted); DoRA and IA3 the torch path."""
import copy

import peft
import pytest
import torch

import adapters_core as ac

from _gpu import VOCAB, hf_llama, kernel_counts, our_decoder, peft_adapter_folders, triton_expected

pytestmark = pytest.mark.gpu
ROWS = ["r4", "__base__", "r16rs", "ia3", "r8all", "dora", "r4", "r8all"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return peft_adapter_folders(hf_llama("cpu"), tmp_path_factory.mktemp("gpu_adapters"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_rows_equal_peft(device, folders, dtype):
    hf = hf_llama(device, dtype)
    ours = our_decoder(hf_llama(device), device, dtype)
    for name, folder in folders.items():
        ac.load_adapter(ours, str(folder), adapter_name=name, autocast_adapter_dtype=False)
    ours.eval()
    x = torch.randint(0, VOCAB, (len(ROWS), 12), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.inference_mode(), kernel_counts() as counts, ac.mixed_batch(ours, ROWS):
        out = ours(x).float()
    refs = {}
    with torch.inference_mode():
        base = hf(x).logits.float()
        for name in set(ROWS) - {"__base__"}:
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folders[name]), autocast_adapter_dtype=False)
            refs[name] = pm.eval()(x).logits.float()
    scale = base.abs().max()
    tol = 1e-4 if dtype == torch.float32 else 0.05 * float(scale)
    for i, name in enumerate(ROWS):
        ref = base[i] if name == "__base__" else refs[name][i]
        torch.testing.assert_close(out[i], ref, atol=tol, rtol=0, msg=f"row {i} ({name})")
        if name != "__base__":
            assert (ref - base[i]).abs().max() > 2 * tol, f"adapter {name} barely moves the logits"
    assert (counts["sgmv"] > 0) == triton_expected(device)
