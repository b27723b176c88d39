"""Per-row / per-token adapter scales (a request's `adapter_scale`): the delta of a token on scale s equals
that adapter alone with its LoRA scaling multiplied by s, through the fused kernel (the native build, the
AVX2 build and the portable build) and the torch path, for LoRA, LoRA with a bias, AdaLoRA and LoRA on an
embedding; tokens on scale 1 keep exactly the bits of a batch without scales, and all-ones scales are the
unscaled batch itself."""
import copy
import os

import pytest
import torch

import adapters_core as ac
from adapters_core import sgmv
from adapters_core.cpu_flags import is_x86_64
from _models import PerTokenModel
from sgmv_tables import Slots


CONFIGS = {
    "lora": ac.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "up_proj"],
                          init_lora_weights=False),
    "lora2": ac.LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"],
                           init_lora_weights=False),
    "ada": ac.AdaLoraConfig(init_r=4, target_r=4, total_step=10, lora_alpha=6, target_modules=["up_proj"]),
}
TOKEN_PLAN = [("lora", 0.5), ("lora", 0.5), ("lora2", 1.0), ("__base__", 1.0), ("lora2", -1.5), ("ada", 2.0),
              ("lora", 1.0), ("ada", 2.0), ("ada", 2.0), ("lora2", 0.0)]


def _model(configs=CONFIGS, dtype=torch.float32):
    torch.manual_seed(0)
    model = PerTokenModel()
    for name, cfg in configs.items():
        ac.inject_adapter_in_model(cfg, model, name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adalora_E" in n or "lora_B" in n or "adalora_B" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.to(dtype).eval()


def _scaled_alone(model, ids, name, scale):
    """The oracle: a copy of the model with `name` active and its LoRA scaling multiplied by `scale`."""
    if name == "__base__":
        copy_ = copy.deepcopy(model)
        ac.disable_adapters(copy_)
        return copy_(ids)
    copy_ = copy.deepcopy(model)
    for _, layer in ac.model_tree.adapter_layers(copy_):
        if name in layer.scaling:
            layer.scaling[name] *= scale
    ac.set_adapter(copy_, name)
    return copy_(ids)


def _arch_kernel(arch):
    if arch != "native" and not is_x86_64():
        pytest.skip(f"-march={arch} is an x86-64 level")
    module = sgmv.kernel(arch)
    if module is None:
        if os.environ.get("CI"):
            raise RuntimeError("the fused CPU kernel did not build under CI")
        pytest.skip("the fused CPU kernel is unavailable here")
    return module


@pytest.mark.parametrize("arch", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
def test_kernel_scales_the_shrink_and_keeps_unscaled_bits(arch, wdt):
    module = _arch_kernel(arch)
    fin, fout, rows = 40, 70, 9                          # rank > 16 and out not a multiple of 64: the tails
    wide = Slots(fin, fout, [0, 20, 7, 20], [wdt] * 4)
    narrow = Slots(fin, 30, [0, 5, 5, 3], [wdt] * 4, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, fin, generator=g)
    slots = torch.tensor([3, 0, 1, 3, 1, 2, 2, 3, 1])
    scales = torch.tensor([0.5, 1.0, -2.0, 1.0, 0.0, 3.0, 1.0, 0.25, 1.0])
    base = torch.randn(rows, fout, generator=g)
    plain, scaled, ones = base.clone(), base.clone(), base.clone()
    module.lora_add_group_([plain], x, [wide.table], slots)
    module.lora_add_group_([scaled], x, [wide.table], slots, scales)
    module.lora_add_group_([ones], x, [wide.table], slots, torch.ones(rows))
    expected = (base.double() + wide.delta(x, slots, scales)).float()
    torch.testing.assert_close(scaled, expected, atol=1e-5, rtol=1e-5)
    at_one = scales == 1
    assert torch.equal(scaled[at_one], plain[at_one]) and torch.equal(ones, plain)
    assert torch.equal(scaled[4], base[4])                                              # scale 0: no delta
    group_plain, group_scaled = [base.clone(), base[:, :30].clone()], [base.clone(), base[:, :30].clone()]
    module.lora_add_group_(group_plain, x, [wide.table, narrow.table], slots)
    module.lora_add_group_(group_scaled, x, [wide.table, narrow.table], slots, scales)
    torch.testing.assert_close(group_scaled[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(group_scaled[1], (base[:, :30].double() + narrow.delta(x, slots, scales)).float(),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(group_scaled[1][at_one], group_plain[1][at_one])
    with pytest.raises(RuntimeError, match="scales"):
        module.lora_add_group_([plain], x, [wide.table], slots, torch.ones(rows - 1))


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_token_batch_scales_equal_scaled_adapters_alone(monkeypatch, path):
    if path == "kernel":
        _arch_kernel("native")
    else:
        monkeypatch.setattr(sgmv, "kernel", lambda arch="native": None)
    model = _model()
    ids = torch.randint(0, 50, (len(TOKEN_PLAN),), generator=torch.Generator().manual_seed(3))
    names, scales = [n for n, _ in TOKEN_PLAN], [s for _, s in TOKEN_PLAN]
    with torch.inference_mode():
        with ac.token_batch(model, names, scales=scales):
            scaled = model(ids)
        with ac.token_batch(model, names):
            plain = model(ids)
        with ac.token_batch(model, names, scales=[1.0] * len(names)):
            ones = model(ids)
    assert torch.equal(ones, plain)
    for t, (name, scale) in enumerate(TOKEN_PLAN):
        expected = _scaled_alone(model, ids[t:t + 1], name, scale)[0]
        torch.testing.assert_close(scaled[t], expected, atol=1e-5, rtol=1e-5)
        if scale == 1.0:
            assert torch.equal(scaled[t], plain[t])           # a scaled neighbour changes no bit of this token
        elif name != "__base__":
            assert (scaled[t] - plain[t]).abs().max() > 1e-3


def test_rows_scales_cover_bias_and_embedding_loras():
    """The torch paths that the kernel does not take: a LoRA with lora_B's bias (scaled with the delta, as
    PEFT's scaling scales it) and a LoRA on the embedding, in a mixed batch of rows."""
    configs = {"bias": ac.LoraConfig(r=3, target_modules=["q_proj", "lm_head"], lora_bias=True,
                                     init_lora_weights=False),
               "emb": ac.LoraConfig(r=5, target_modules=["embed_tokens", "up_proj"], init_lora_weights=False)}
    model = _model(configs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_embedding_A" in n or "lora_B.bias" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    ids = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(4))
    rows = [("bias", 0.3), ("emb", -0.8), ("bias", 1.0), ("emb", 2.5)]
    with torch.inference_mode(), ac.mixed_batch(model, [n for n, _ in rows], scales=[s for _, s in rows]):
        scaled = model(ids)
    for i, (name, scale) in enumerate(rows):
        torch.testing.assert_close(scaled[i], _scaled_alone(model, ids[i:i + 1], name, scale)[0], atol=1e-5,
                                   rtol=1e-5)


def test_bad_scales_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="scales"):
        ac.token_batch(model, ["lora", "lora"], scales=[0.5])
    with pytest.raises(ValueError, match="finite"):
        ac.mixed_batch(model, ["lora"], scales=[float("nan")])
