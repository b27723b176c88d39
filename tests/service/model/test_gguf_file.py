"""`read_gguf` against gguf's own `GGUFReader`: the same metadata values and the same tensors (names, types,
shapes, bytes) on the embedded SmolLM2 file and on a file written by `GGUFWriter` with every value type;
files that are not GGUF, or cut short, are refused with a ValueError naming the problem."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from service.model.gguf_file import read_gguf

from _model_fixtures import gguf_path


def same_as_gguf_reader(path):
    metadata, tensors = read_gguf(path)
    reader = GGUFReader(path)
    expected = {key: field.contents() for key, field in reader.fields.items()}
    expected = {k: v for k, v in expected.items() if not k.startswith("GGUF.")}    # the reader's header fields
    assert metadata == expected
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert ours.tensor_type == theirs.tensor_type and ours.shape.tolist() == theirs.shape.tolist()
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        assert np.array_equal(ours.data, theirs.data)
    return metadata, tensors


def test_embedded_model_reads_as_gguf_reader_reads_it():
    metadata, tensors = same_as_gguf_reader(gguf_path())
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and len(tensors) == 272


def test_every_value_type_and_tensor_kind(tmp_path):
    path = str(tmp_path / "t.gguf")
    w = GGUFWriter(path, "llama")
    w.add_uint32("u32", 7)
    w.add_int32("i32", -7)
    w.add_float32("f32", 1e-5)
    w.add_float64("f64", 0.1)
    w.add_bool("flag", True)
    w.add_string("text", "héllo")
    w.add_uint64("u64", 2**40)
    w.add_array("words", ["a", "b c", ""])
    w.add_array("ints", [1, -2, 3])
    w.add_array("floats", [0.5, 1.5])
    w.add_tensor("f32.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("f16.weight", np.ones((3, 32), dtype=np.float16))
    q = quantize(np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32), GGMLQuantizationType.Q4_1)
    w.add_tensor("q.weight", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    metadata, tensors = same_as_gguf_reader(path)
    assert metadata["text"] == "héllo" and metadata["words"] == ["a", "b c", ""] and metadata["flag"] is True
    assert tensors[2].data.shape == (4, 40)                      # two Q4_1 blocks of 20 bytes per row


def test_not_gguf_and_truncated_files_are_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(str(bad))
    with open(gguf_path(), "rb") as f:
        head = f.read(100_000)                  # inside the token list
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(ValueError, match="truncated or malformed"):
        read_gguf(str(cut))


@pytest.mark.parametrize("kind", [GGMLQuantizationType.F32, GGMLQuantizationType.Q4_1])
def test_a_file_cut_inside_the_tensor_data_names_the_tensor(tmp_path, kind):
    """numpy's reshape error ("cannot reshape array of size ...") was all a cut GGUF said."""
    path = tmp_path / "t.gguf"
    w = GGUFWriter(str(path), "llama")
    values = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    data = values if kind == GGMLQuantizationType.F32 else quantize(values, kind)
    w.add_tensor("first.weight", np.ones((2, 32), dtype=np.float32))
    w.add_tensor("last.weight", data, raw_shape=data.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])
    with pytest.raises(ValueError, match=rf"truncated GGUF: tensor last\.weight \({kind.name}, .* runs past the "
                                         rf"end of the file \({len(whole) - 40} bytes\)"):
        read_gguf(str(path))
