"""A base model with NaN or infinite weights is refused at start, naming the tensor (it used to start and then
answer every request with a 500): dense tensors checked whole, stored blocks through a probe forward."""
import pytest
import torch
from gguf import GGMLQuantizationType as T

from _model_fixtures import write_tiny_gguf
from service.model.decoder import Decoder
from service.model.finite_check import check_finite_dense, check_finite_stored
from service.model.gguf_loader import load_gguf
from test_gguf_loader import _tiny_llama


def _written(tmp_path, poisoned: str, kind):
    model = _tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[poisoned][3, 5] = float("nan")
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, "llama", model.config, state, {poisoned: kind})
    return path


def test_a_nan_in_a_dense_tensor_is_named(tmp_path):
    path = _written(tmp_path, "model.layers.1.mlp.up_proj.weight", T.F32)
    loaded = load_gguf(path)                                  # every tensor dense
    with pytest.raises(ValueError, match=r"tiny\.gguf: the model's weights are not finite: "
                                         r"model\.layers\.1\.mlp\.up_proj\.weight has 1 NaN"):
        check_finite_dense(loaded, path)


def test_a_nan_in_stored_blocks_is_found_by_the_probe_and_named(tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    path = _written(tmp_path, name, T.Q8_0)
    loaded = load_gguf(path, keep_stored=True)
    assert name in loaded.stored
    check_finite_dense(loaded, path)                          # the dense rest is fine
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=torch.float32, stored=loaded.stored)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} has 32 NaN"):      # its Q8_0 block
        check_finite_stored(loaded, model, path)


def test_finite_models_pass(tmp_path):          # (neither check raises)
    model = _tiny_llama()
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, "llama", model.config, model.state_dict(), {"model.layers.0.mlp.up_proj.weight": T.Q4_1})
    loaded = load_gguf(path, keep_stored=True)
    check_finite_dense(loaded, path)
    check_finite_stored(loaded, Decoder.from_state_dict(loaded.config, loaded.state_dict, dtype=torch.float32,
                                                        stored=loaded.stored), path)
