"""Hypothesis strategies for malformed adapter uploads, each invalid by construction (a refusal is the only
right answer): `adapter_config.json` files, safetensors files with a broken length prefix, header, dtype,
shape, offsets or key, and zip / tar archives with path traversal, links, devices, bombs, nesting, wrong
names or truncation. Each strategy draws from one valid adapter (`config`, `weights`) and returns the
multipart `files` of the upload."""
from __future__ import annotations

import io
import json
import stat
import struct
import tarfile
import zipfile

from hypothesis import strategies as st

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
REAL_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
NOT_A_NUMBER = st.text(max_size=8) | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)


# ----- adapter_config.json ----------------------------------------------------------------------------------------
def configs(config: bytes, rank: int) -> st.SearchStrategy[dict]:
    base = json.loads(config)
    fake_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
        lambda s: s not in REAL_TARGETS)
    field = st.one_of(
        st.tuples(st.just("r"), st.integers(max_value=0) | st.integers(min_value=rank + 1) | NOT_A_NUMBER
                  | st.floats(allow_nan=True).filter(lambda x: x != rank)),
        st.tuples(st.just("peft_type"), st.text(max_size=10).filter(lambda s: s.upper() != "LORA") | JSON.filter(
            lambda v: not isinstance(v, str))),
        st.tuples(st.just("lora_alpha"), NOT_A_NUMBER),
        st.tuples(st.just("target_modules"), st.lists(fake_name, min_size=1, max_size=3)
                  | st.integers() | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
        st.tuples(st.just("rank_pattern"), st.dictionaries(st.sampled_from(["q_proj", "v_proj"]),
                                                           st.integers(min_value=1).filter(lambda r: r != rank),
                                                           min_size=1, max_size=2)),
    )
    mutated = field.map(lambda kv: json.dumps({**base, kv[0]: kv[1]}).encode())
    truncated = st.integers(0, len(config) - 1).map(lambda n: config[:n])
    not_an_object = JSON.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())
    no_type = st.just(json.dumps({k: v for k, v in base.items() if k != "peft_type"}).encode())
    garbage = st.binary(max_size=64).filter(lambda b: not b.strip().startswith(b"{"))
    return st.one_of(mutated, truncated, not_an_object, no_type, garbage).map(
        lambda c: {"files": {CONFIG: c}, "kind": "config"})


# ----- safetensors -------------------------------------------------------------------------------------------------
def _split(weights: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", weights[:8])[0]
    return json.loads(weights[8:8 + n]), weights[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_files(weights: bytes) -> st.SearchStrategy[dict]:
    header, data = _split(weights)
    keys = sorted(k for k in header if k != "__metadata__")
    n = struct.unpack("<Q", weights[:8])[0]

    def set_field(key, name, value):
        mutated = json.loads(json.dumps(header))
        mutated[key][name] = value
        return _join(mutated, data)

    def rename(key, new):
        mutated = {(new if k == key else k): v for k, v in header.items()}
        return _join(mutated, data)

    dtype = st.sampled_from(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "f32", ""]) | st.text(max_size=5)
    shape = st.lists(st.integers(-3, 70), max_size=3)
    offsets = st.lists(st.integers(-10, len(data) + 100), min_size=0, max_size=3)
    key = st.sampled_from(keys)
    cases = st.one_of(
        st.integers(0, 2**64 - 1).filter(lambda x: x != n).map(lambda x: struct.pack("<Q", x) + weights[8:]),
        st.binary(max_size=40).map(lambda b: struct.pack("<Q", len(b)) + b + data),
        st.builds(lambda k, v: set_field(k, "dtype", v), key, dtype.filter(lambda d: d != "F32")),
        st.builds(lambda k, v: set_field(k, "shape", v), key, shape).filter(lambda b: b != weights),
        st.builds(lambda k, v: set_field(k, "data_offsets", v), key, offsets).filter(lambda b: b != weights),
        st.builds(rename, key, st.text(min_size=1, max_size=30).filter(lambda s: s not in header)),
        st.integers(0, len(weights) - 1).map(lambda i: weights[:i]),
        st.binary(min_size=1, max_size=64).map(lambda b: weights + b),
    )
    return cases.map(lambda w: {"files": {WEIGHTS: w}, "kind": "safetensors"})


# ----- archives ----------------------------------------------------------------------------------------------------
def _zip(members: list[tuple]) -> bytes:
    """members: (name, data) or (name, data, unix mode)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, *mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode:
                info.create_system = 3                    # unix, so the mode bits count
                info.external_attr = mode[0] << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def _tar(members: list[tuple], compress: bool = True) -> bytes:
    """members: (name, data) for files, or (name, tar type, link name) for links, devices and fifos."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tf:
        for name, payload, *link in members:
            info = tarfile.TarInfo(name)
            if link:                                      # (tar types are bytes too: tell them by the link)
                info.type, info.linkname = payload, link[0]
                tf.addfile(info)
            else:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def archives(config: bytes, weights: bytes, max_archive_bytes: int) -> st.SearchStrategy[dict]:
    good = [(CONFIG, config), (WEIGHTS, weights)]
    escape = st.sampled_from(["../evil", "../../evil", "a/../../evil", "/tmp/evil", "C:/evil", "a\\..\\evil",
                              "./../evil", "a/./../../evil"])
    special = st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                               tarfile.FIFOTYPE])
    wrong_config = st.sampled_from(["adapter_config.JSON", "config.json", "adapter_config.json.bak", "a/b/" + CONFIG])
    wrong_weights = st.sampled_from(["adapter_model.pt", "model.safetensors", "adapter_model.SAFETENSORS",
                                     "adapter_model.safetensors.bak", "a/b/" + WEIGHTS])
    big = st.integers(max_archive_bytes + 1, 4 * max_archive_bytes)
    kinds = st.one_of(
        escape.map(lambda n: ("a.zip", _zip(good + [(n, b"x")]))),
        escape.map(lambda n: ("a.tar.gz", _tar(good + [(n, b"x")]))),
        st.sampled_from([WEIGHTS, "README.md"]).map(
            lambda n: ("a.zip", _zip([(CONFIG, config), (n, b"/etc/passwd", stat.S_IFLNK | 0o777)]
                                     + ([(WEIGHTS, weights)] if n != WEIGHTS else []))),
        ),
        st.tuples(special, st.sampled_from([WEIGHTS, "README.md"])).map(
            lambda t: ("a.tar.gz", _tar([(CONFIG, config), (t[1], t[0], "/etc/passwd")]
                                        + ([(WEIGHTS, weights)] if t[1] != WEIGHTS else [])))),
        big.map(lambda size: ("bomb.zip", _zip(good + [("pad.bin", bytes(size))]))),
        big.map(lambda size: ("bomb.tar.gz", _tar(good + [("pad.bin", bytes(size))]))),
        st.just(("nested.zip", _zip([("inner.zip", _zip(good))]))),
        st.just(("nested.tar.gz", _tar([("inner.tar.gz", _tar(good))]))),
        wrong_config.map(lambda n: ("names.zip", _zip([(n, config), (WEIGHTS, weights)]))),
        wrong_weights.map(lambda n: ("names.tar.gz", _tar([(CONFIG, config), (n, weights)]))),
        st.just(("two.zip", _zip([("a/" + n, d) for n, d in good] + [("b/" + n, d) for n, d in good]))),
        st.sampled_from(["a.rar", "a.7z", "a.zip.exe", "a", "a.gz"]).map(lambda n: (n, _zip(good))),
        st.tuples(st.sampled_from(["a.zip", "a.tar.gz", "a.tgz", "a.tar"]), st.binary(max_size=200)),
        st.integers(0, len(_zip(good)) - 1).map(lambda i: ("cut.zip", _zip(good)[:i])),
        # (a .tar.gz cut only inside its trailing zero padding is still a complete archive: cut in the first half)
        st.integers(0, len(_tar(good)) // 2).map(lambda i: ("cut.tar.gz", _tar(good)[:i])),
    )
    return kinds.map(lambda k: {"files": {"archive": k}, "kind": "archive"})
