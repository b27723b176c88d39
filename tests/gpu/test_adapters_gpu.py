"""Adapters on the GPU equal PEFT: our decoder with LoRA (ranks 4-16, rsLoRA, alpha 8-32), DoRA and IA3
adapters loaded from PEFT's folders, one adapter per row of a mixed batch beside base rows, against PEFT's
model holding that adapter alone on the same device. fp32 to 1e-4; bf16 no further from the fp32 result than
PEFT's own bf16 run is. The plain LoRA layers take the Triton SGMV kernels on CUDA (counted); DoRA and IA3 the
torch path."""
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


def peft_rows(hf, folders, x):
    """PEFT's logits [len(ROWS), S, V] row by row (the base model's for base rows, each adapter alone on a copy
    of `hf`), and the base model's for every row."""
    with torch.inference_mode():
        base = hf(x).logits.float()
        refs = {name: peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folders[name]),
                                                     autocast_adapter_dtype=False).eval()(x).logits.float()
                for name in set(ROWS) - {"__base__"}}
    return torch.stack([base[i] if name == "__base__" else refs[name][i] for i, name in enumerate(ROWS)]), base


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
    ref, base = peft_rows(hf, folders, x)
    if dtype == torch.float32:
        for i, name in enumerate(ROWS):
            torch.testing.assert_close(out[i], ref[i], atol=1e-4, rtol=0, msg=f"row {i} ({name})")
    else:
        # bf16: ours no further from the fp32 result than PEFT's own bf16 run is (twice its error, or 1% of the
        # row's largest logit): an adapter that inflates the logits inflates everyone's rounding with them
        truth, _ = peft_rows(hf_llama(device), folders, x)
        for i, name in enumerate(ROWS):
            ours_err, peft_err = (out[i] - truth[i]).abs().max(), (ref[i] - truth[i]).abs().max()
            floor = 0.01 * truth[i].abs().max()
            assert ours_err <= 2 * peft_err + floor, (f"row {i} ({name}): ours {ours_err:.4g} from fp32, PEFT's "
                                                      f"bf16 {peft_err:.4g}, largest logit {truth[i].abs().max():.4g}")
    moved = 2e-4 if dtype == torch.float32 else 0.1 * float(base.abs().max())     # twice the fp32 / old bf16 tolerance
    for i, name in enumerate(ROWS):
        if name != "__base__":
            assert (ref[i] - base[i]).abs().max() > moved, f"adapter {name} barely moves the logits"
    assert (counts["sgmv"] > 0) == triton_expected(device)
