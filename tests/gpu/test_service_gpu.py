"""The service end to end on the GPU: `python -m service --device <device>` (the real CLI under uvicorn) on a
small model folder, a PEFT LoRA uploaded over the admin API, then greedy `/generate` requests for the base
model and the adapter sent at once (one batch), each continuation transformers' / PEFT's greedy choice on
the same device (teacher-forced); `/info` reports the device. TGI's `/generate` is used because it reports the
prompt's and the continuation's token ids (`decoder_input_details`, `details`)."""
import copy
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import peft
import pytest
import torch
import transformers

from _gpu import assert_greedy_under, not_greedy_steps
from _load_model_folder import write_tiny_model
from _load_process_server import ServerProcess

pytestmark = pytest.mark.gpu
PROMPTS = ["The GPU path, end to end:", "Adapters on", "A third prompt, somewhat longer than the others are.", "x"]
KERNEL_SWITCHES = ("ADAPTER_SERVE_TRITON", "ADAPTER_SERVE_CPU_KERNELS", "ADAPTER_SERVE_QUANT_KERNEL")


def lora_folder(model_folder, folder):
    base = transformers.LlamaForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(folder))
    return folder


def generate(url, prompt, adapter):
    parameters = {"max_new_tokens": 10, "details": True, "decoder_input_details": True}
    if adapter:
        parameters["adapter_id"] = adapter
    r = httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=300)
    r.raise_for_status()
    details = r.json()["details"]
    return [t["id"] for t in details["prefill"]], [t["id"] for t in details["tokens"]]


def test_service_serves_base_and_adapter_on_device(device, tmp_path):
    model_folder = write_tiny_model(tmp_path / "model", hidden=128, layers=2)
    adapter = lora_folder(model_folder, tmp_path / "lora")
    # the dry run's kernel switches reach the server (ServerProcess passes no ADAPTER_SERVE_* of this process)
    switches = {k[len("ADAPTER_SERVE_"):].lower(): os.environ[k] for k in KERNEL_SWITCHES if k in os.environ}
    with ServerProcess(tmp_path, model=model_folder, device=device, dtype="float32", max_batch_size=4,
                       max_seq_len=256, **switches) as server:
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        assert info["model_device_type"] == device.type and info["model_dtype"] == "torch.float32"
        files = {"adapter_config.json": (adapter / "adapter_config.json").read_bytes(),
                 "adapter_model.safetensors": (adapter / "adapter_model.safetensors").read_bytes()}
        r = httpx.post(f"{server.url}/admin/adapters", data={"name": "gpu-lora"}, files=files, timeout=120)
        assert r.status_code in (200, 201), r.text
        jobs = [(p, a) for p in PROMPTS for a in (None, "gpu-lora")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: generate(server.url, *job), jobs))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32).to(device).eval()
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter)).eval()
    for (prompt, name), (prompt_ids, tokens) in zip(jobs, results):
        assert len(tokens) == 10 and prompt_ids
        assert_greedy_under(lora if name else hf, prompt_ids, tokens, device)
        if name:
            assert not_greedy_steps(hf, prompt_ids, tokens, device)      # the adapter changed the continuation
