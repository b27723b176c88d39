"""Every bad input gets its own status and a message naming the fault, and changes nothing: no record,
no file in the store (no staging leftovers either), the served model bit for bit as before."""
import io
import json
import os
import pickle
import tarfile
import zipfile

import pytest
import torch
from safetensors.torch import load as load_bytes, save as save_bytes

from service.registry import RegistryError

from _fixtures import assert_same_model, fingerprint, make_registry, peft_adapter, run, store_files, Events

LORA = peft_adapter("lora")
RANK_PATTERN = peft_adapter("lora_rank_pattern")
MARKER = "/tmp/registry-test-pickle-ran"


def _config(**changes) -> bytes:
    data = json.loads(LORA.config)
    data.update(changes)
    return json.dumps(data).encode()


class _RunsCode:
    """Unpickling this runs a shell command: a `.bin` must never be unpickled with full pickle."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _evil_pickle() -> bytes:
    return pickle.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _RunsCode()})


def _evil_torch_save() -> bytes:
    buffer = io.BytesIO()
    torch.save({"x": _RunsCode()}, buffer)
    return buffer.getvalue()


def _wrong_shapes() -> bytes:
    tensors = load_bytes(LORA.weights)
    return save_bytes({k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in tensors.items()})


def _extra_tensor() -> bytes:
    tensors = load_bytes(LORA.weights)
    tensors["base_model.model.model.layers.0.mlp.nonexistent.lora_A.weight"] = torch.zeros(4, 64)
    return save_bytes(tensors)


def _int_tensors() -> bytes:
    tensors = load_bytes(LORA.weights)
    return save_bytes({k: v.to(torch.int32) for k, v in tensors.items()})


def _zip(entries: dict, symlink: str = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _tar(entries: dict, link: tuple = None, mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = link[1], "/etc/passwd"
            tf.addfile(info)
    return buffer.getvalue()


GOOD_FILES = {"adapter_config.json": LORA.config, "adapter_model.safetensors": LORA.weights}


def files(config=LORA.config, weights=LORA.weights, filename="adapter_model.safetensors", name="new"):
    return lambda r: r.register_files(name, config, weights, weights_filename=filename)


def archive(data, filename="a.zip", name="new"):
    return lambda r: r.register_archive(name, data, filename)


CASES = {
    # name -> (attempt, status, words the message must contain)
    "unknown name": (lambda r: r.acquire("nope"), 404, ["'nope'", "not found"]),
    "bad name (path)": (files(name="../evil"), 422, ["invalid adapter name"]),
    "bad name (space)": (files(name="a b"), 422, ["invalid adapter name"]),
    "bad name (too long)": (files(name="x" * 65), 422, ["invalid adapter name"]),
    "bad name (leading dot)": (files(name=".hidden"), 422, ["invalid adapter name"]),
    "duplicate name": (files(name="existing"), 409, ["'existing'", "already exists"]),
    "config not JSON": (files(config=b"{not json"), 400, ["adapter_config.json", "not valid JSON"]),
    "config not an object": (files(config=b"[1, 2]"), 422, ["JSON object"]),
    "unknown peft_type": (files(config=_config(peft_type="LOHA")), 422, ["LOHA", "not supported"]),
    "unsupported feature": (files(config=_config(layer_replication=[[0, 1]])), 422, ["layer_replication"]),
    "rank too high": (files(config=_config(r=128)), 422, ["rank 128", "max_lora_rank=64"]),
    "rank_pattern too high": (files(config=_config(rank_pattern={"v_proj": 96})), 422, ["rank 96"]),
    "rank_pattern not a number": (files(config=_config(rank_pattern={"v_proj": "big"})), 422, ["numbers"]),
    "targets not in model": (files(config=_config(target_modules=["nonexistent_proj"])), 422,
                             ["nonexistent_proj", "matched no module"]),
    "wrong shapes": (files(weights=_wrong_shapes()), 422, ["shapes do not fit"]),
    "config rank differs from tensors": (files(config=_config(r=8)), 422, ["shapes do not fit"]),
    "tensor for no module": (files(weights=_extra_tensor()), 422, ["fit no module", "nonexistent"]),
    "integer tensors": (files(weights=_int_tensors()), 422, ["floating point"]),
    "truncated safetensors": (files(weights=LORA.weights[: len(LORA.weights) // 2]), 422, ["truncated"]),
    "garbage weights": (files(weights=b"\x00" * 64), 422, ["adapter_model.safetensors"]),
    "pickle .bin runs code": (files(weights=_evil_pickle(), filename="adapter_model.bin"), 422, ["weights_only"]),
    "torch.save .bin runs code": (files(weights=_evil_torch_save(), filename="adapter_model.bin"), 422,
                                  ["weights_only"]),
    "weights file type": (files(filename="adapter_model.pt"), 422, [".safetensors"]),
    "oversize weights": (files(config=RANK_PATTERN.config, weights=RANK_PATTERN.weights), 413,
                         ["max_adapter_bytes"]),
    "zip with ..": (archive(_zip({"../adapter_config.json": LORA.config, **GOOD_FILES})), 422, ["'..'"]),
    "zip with absolute path": (archive(_zip({"/etc/adapter_config.json": LORA.config, **GOOD_FILES})), 422,
                               ["absolute"]),
    "zip with symlink": (archive(_zip(GOOD_FILES, symlink="link")), 422, ["symlink"]),
    "tar with symlink": (archive(_tar(GOOD_FILES, link=("adapter_model.bin", tarfile.SYMTYPE)), "a.tar.gz"), 422,
                         ["symlink"]),
    "tar with hard link": (archive(_tar(GOOD_FILES, link=("x", tarfile.LNKTYPE)), "a.tgz"), 422, ["hard link"]),
    "tar with device": (archive(_tar(GOOD_FILES, link=("dev", tarfile.CHRTYPE)), "a.tgz"), 422, ["device"]),
    "tar with ..": (archive(_tar({"a/../../x": b"1", **GOOD_FILES}), "a.tgz"), 422, ["'..'"]),
    # expanded members count against the smaller limit, here max_adapter_bytes (an archive holds one adapter)
    "archive over the size limit (uncompressed)": (archive(_zip({**GOOD_FILES, "big.bin": b"\0" * 300_000})), 413,
                                                   ["max_adapter_bytes"]),
    "tar over the size limit (uncompressed)": (archive(_tar({**GOOD_FILES, "big.bin": b"\0" * 300_000}), "a.tgz"),
                                               413, ["max_adapter_bytes"]),
    "archive over the size limit (upload)": (archive(os.urandom(300_000)), 413, ["max_archive_bytes"]),
    "archive not an archive": (archive(b"definitely not a zip"), 400, ["not a valid zip"]),
    "archive bad extension": (archive(_zip(GOOD_FILES), filename="a.rar"), 422, [".zip"]),
    "archive without config": (archive(_zip({"adapter_model.safetensors": LORA.weights})), 422,
                               ["adapter_config.json"]),
    "archive without weights": (archive(_zip({"adapter_config.json": LORA.config})), 422, ["adapter_model"]),
    "archive with two adapters": (archive(_zip({**{f"a/{k}": v for k, v in GOOD_FILES.items()},
                                                "b/adapter_config.json": LORA.config,
                                                "b/adapter_model.safetensors": b"x"})), 422,
                                  ["several"]),
    "local folder missing": (lambda r: r.register_path("new", "/nonexistent/folder"), 404, ["does not exist"]),
    "hub id that is a path": (lambda r: r.register_hub("new", "/etc"), 422, ["not a hub repo id"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_changes_nothing(tmp_path, case):
    attempt, status, words = CASES[case]
    if os.path.exists(MARKER):
        os.remove(MARKER)
    events = Events()

    async def main():
        registry = make_registry(tmp_path / "store", max_adapter_bytes=16_000, max_archive_bytes=200_000,
                                 events=events)
        await registry.register_files("existing", LORA.config, LORA.weights)
        lease = await registry.acquire("existing")
        registry.release(lease)
        before = ([r.to_dict() for r in registry.list()], fingerprint(registry.model),
                  store_files(tmp_path / "store"), registry.tier_counts(), list(events.calls))
        with pytest.raises(RegistryError) as err:
            await attempt(registry)
        await registry.drain()
        assert [r.to_dict() for r in registry.list()] == before[0]
        assert_same_model(before[1], registry.model)
        assert store_files(tmp_path / "store") == before[2]
        assert registry.tier_counts() == before[3]
        assert events.calls == before[4]
        return err.value

    error = run(main())
    assert error.status == status, str(error)
    for word in words:
        assert word in str(error), (word, str(error))
    assert not os.path.exists(MARKER), "the pickle ran"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finiteness_check_finds_every_bad_value_and_passes_huge_finite_ones(dtype):
    """check_tensors proves a buffer finite from its fp32 sum and searches tensor by tensor only when that sum
    is not finite: a NaN, +inf or -inf anywhere is named; finite values whose sum overflows still pass."""
    from adapters_core.packing import pack_adapter_tensors
    from service.registry.validation import Invalid, check_tensors
    big = torch.finfo(dtype).max
    keys = ["m.0.lora_A.weight", "m.0.lora_B.weight", "m.1.lora_A.weight"]
    fine = {keys[0]: torch.full((4, 8), big, dtype=dtype), keys[1]: torch.full((8, 4), big, dtype=dtype),
            keys[2]: torch.randn(4, 8).to(dtype)}
    if dtype != torch.float16:                  # fp16's largest values still sum to a finite fp32
        assert not torch.isfinite(fine[keys[0]].sum(dtype=torch.float32)), "the sum overflows"
    for tensors in (fine, pack_adapter_tensors(fine)):
        check_tensors(tensors, "adapter_model.safetensors")
    for bad in (float("nan"), float("inf"), float("-inf")):
        for key in keys:
            tensors = {k: v.clone() for k, v in fine.items()}
            tensors[key].view(-1)[5] = bad
            for form in (tensors, pack_adapter_tensors(tensors)):
                with pytest.raises(Invalid, match=f"{key}.*1 non-finite"):
                    check_tensors(form, "adapter_model.safetensors")
