"""checkpoint.py against TensorFlow's own reader, the safetensors package, torch, and damaged files."""
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoint
from checkpoint import load_safetensors, load_tf_checkpoint, mapped_file, read_tf_index, save_safetensors
from errors import GPT2Error
from conftest import ROOT, SHARED_124M_HEAD, flip_byte, tf_variables

FIXTURES = ["tiny", "h12", "wide"]
DATA = ".data-00000-of-00001"


def bitwise_crc32c(data):
    """CRC32C straight from its definition, one bit at a time: slow, and too simple to get wrong."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def tensorflow_listing(prefix):
    """{name: (shape, dtype)} as TensorFlow lists a checkpoint; it reads only the index for that."""
    import tensorflow as tf

    dtypes = tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    shapes = tf.train.list_variables(prefix)
    return {name: (tuple(shape), np.dtype(dtypes[name].as_numpy_dtype)) for name, shape in shapes}


def listing(prefix):
    return {name: (entry.shape, entry.dtype) for name, entry in read_tf_index(prefix).items()}


def prefix_of(model_dir):
    return str(model_dir / "model.ckpt")


def copy_checkpoint(fixture_model, tmp_path, name="tiny"):
    """A private copy of a fixture checkpoint that a test may damage -> (prefix, params)."""
    model_dir, _, params = fixture_model(name)
    for suffix in (".index", DATA):
        shutil.copyfile(model_dir / f"model.ckpt{suffix}", tmp_path / f"model.ckpt{suffix}")
    return str(tmp_path / "model.ckpt"), params


# ---------------------------------------------------------------------------------------------------
# CRC32C


@pytest.mark.parametrize(
    "data, crc",
    [
        (b"", 0),
        (b"123456789", 0xE3069283),  # the check value of every CRC catalogue
        # RFC 3720 (iSCSI), appendix B.4
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_gives_the_published_check_values(data, crc):
    assert checkpoint._crc32c(data) == crc


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000))
def test_crc32c_equals_the_bitwise_definition(data):
    assert checkpoint._crc32c(data) == bitwise_crc32c(data)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 1023, 1024, 1025, 2049, 3 * 4096 + 1, 70001])
def test_crc32c_equals_the_bitwise_definition_at_every_lane_count(size):
    # Past 1 KiB the lanes double each time the data does; these sizes cross 1, 2, 4, ... 128 lanes.
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert checkpoint._crc32c(data) == bitwise_crc32c(data)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=2000), st.sampled_from([(1, 1), (2, 4), (4, 8), (8, 3)]))
def test_crc32c_joins_many_blocks_and_lanes_exactly(data, lanes_and_steps):
    # Tiny blocks make short data cross many block boundaries, as a 500 MB checkpoint does.
    lanes, steps = lanes_and_steps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "_LANES", lanes)
        patch.setattr(checkpoint, "_STEPS", steps)
        assert checkpoint._crc32c(data) == bitwise_crc32c(data)


def test_crc32c_of_every_tensor_matches_the_crc_tensorflow_stored(fixture_model):
    # The bytes come from the weights the fixture was made of, not from the file: TF's own CRC32C
    # of them (masked) is in the index. "h12" and "wide" have a wte larger than one 16 MiB block.
    for name in FIXTURES:
        model_dir, _, params = fixture_model(name)
        entries = read_tf_index(prefix_of(model_dir))
        for tensor, value in tf_variables(params).items():
            assert checkpoint._masked(checkpoint._crc32c(value.tobytes())) == entries[tensor].crc32c, (name, tensor)


# ---------------------------------------------------------------------------------------------------
# TensorFlow checkpoints written by TensorFlow


@pytest.mark.parametrize("name", FIXTURES)
def test_index_lists_the_names_shapes_and_dtypes_tensorflow_lists(fixture_model, name):
    prefix = prefix_of(fixture_model(name)[0])
    assert listing(prefix) == tensorflow_listing(prefix)


@pytest.mark.parametrize("name", FIXTURES)
def test_tensors_equal_what_tensorflow_reads_bit_for_bit(fixture_model, name):
    import tensorflow as tf

    model_dir, _, params = fixture_model(name)
    prefix = prefix_of(model_dir)
    tensors = load_tf_checkpoint(prefix, verify_crc=True)
    assert tensors.keys() == tf_variables(params).keys()
    for tensor, value in tensors.items():
        expected = tf.train.load_variable(prefix, tensor)
        assert (value.dtype, value.shape) == (expected.dtype, expected.shape), tensor
        assert value.tobytes() == expected.tobytes(), tensor


def test_tensors_are_read_only_plain_views_of_a_memory_map(fixture_model):
    prefix = prefix_of(fixture_model("tiny")[0])
    tensors = load_tf_checkpoint(prefix)
    for tensor, value in tensors.items():
        assert type(value) is np.ndarray and not value.flags.writeable, tensor
        assert os.path.samefile(mapped_file(value), prefix + DATA), tensor
    with pytest.raises(ValueError, match="read-only"):
        tensors["model/wte"][0, 0] = 1.0


def mapping_flags(path):  # -> the VmFlags of each memory map of the file at path in this process (Linux's smaps)
    maps = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text())
    return [re.search(r"^VmFlags:(.*)$", lines, re.M).group(1).split() for lines in maps
            if lines.split("\n", 1)[0].endswith(" " + os.path.realpath(path))]


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(),
                    reason="needs Linux with transparent huge pages")
@pytest.mark.parametrize("file_format", ["tensorflow", "safetensors"])
def test_weights_are_mapped_with_the_advice_to_use_2_mib_pages(fixture_model, tmp_path, file_format):
    prefix = prefix_of(fixture_model("tiny")[0])
    if file_format == "tensorflow":
        path, tensors = prefix + DATA, load_tf_checkpoint(prefix)
    else:
        path = tmp_path / "model.safetensors"
        save_safetensors(path, load_tf_checkpoint(prefix))
        tensors = load_safetensors(path)
    flags = mapping_flags(path)
    assert tensors and flags and all("hg" in each for each in flags)  # "hg": MADV_HUGEPAGE advised


def test_names_selects_which_tensors_are_returned(fixture_model):
    model_dir, _, params = fixture_model("tiny")
    tensors = load_tf_checkpoint(prefix_of(model_dir), names=["model/wpe", "model/h1/mlp/c_fc/w"])
    assert list(tensors) == ["model/wpe", "model/h1/mlp/c_fc/w"]
    assert np.array_equal(tensors["model/h1/mlp/c_fc/w"][0], params["blocks"][1]["mlp"]["c_fc"]["w"])


def test_unknown_tensor_name_is_a_clear_error(fixture_model):
    prefix = prefix_of(fixture_model("tiny")[0])
    with pytest.raises(GPT2Error, match=r"model\.ckpt\.index has no tensor 'model/h9/attn/c_attn/w'"):
        load_tf_checkpoint(prefix, names=["model/h9/attn/c_attn/w"])


def test_reading_needs_no_tensorflow_protobuf_or_safetensors(fixture_model, tmp_path):
    import safetensors.numpy

    model_dir, _, params = fixture_model("wide")
    variables = tf_variables(params)
    safetensors.numpy.save_file(variables, str(tmp_path / "model.safetensors"))
    child = f"""
import sys
for package in ("tensorflow", "google.protobuf", "safetensors"):
    sys.modules[package] = None  # any import of them now fails
sys.path.insert(0, {str(ROOT)!r})
import json
import numpy as np
import checkpoint
from_tf = checkpoint.load_tf_checkpoint({prefix_of(model_dir)!r}, verify_crc=True)
from_st = checkpoint.load_safetensors({str(tmp_path / "model.safetensors")!r})
names = list(from_tf)
open({str(tmp_path / "names.json")!r}, "w").write(json.dumps(names))
np.savez({str(tmp_path / "tensors.npz")!r}, *[from_tf[n] for n in names], *[from_st[n] for n in names])
"""
    subprocess.run([sys.executable, "-c", child], check=True, cwd=tmp_path)
    names = json.loads((tmp_path / "names.json").read_text())
    assert sorted(names) == sorted(variables)
    with np.load(tmp_path / "tensors.npz") as saved:
        for i, name in enumerate(names):
            for array in (saved[f"arr_{i}"], saved[f"arr_{i + len(names)}"]):
                assert array.dtype == np.float32 and array.tobytes() == variables[name].tobytes(), name


# ---------------------------------------------------------------------------------------------------
# OpenAI's own 124M checkpoint: the whole index, and the first 3 MiB of the data file


@pytest.fixture
def openai_124m_head():
    if not SHARED_124M_HEAD.exists():
        pytest.skip(f"{SHARED_124M_HEAD} is absent (it lives in ../shared beside the repository)")
    return str(SHARED_124M_HEAD / "model.ckpt")


def test_openai_124m_index_lists_its_148_float32_tensors(openai_124m_head):
    entries = read_tf_index(openai_124m_head)
    assert len(entries) == 148
    assert entries["model/wte"].shape == (50257, 768)
    assert entries["model/wpe"].shape == (1024, 768)
    assert entries["model/h0/attn/c_attn/w"].shape == (1, 768, 2304)
    assert {entry.dtype for entry in entries.values()} == {np.dtype(np.float32)}
    assert listing(openai_124m_head) == tensorflow_listing(openai_124m_head)  # TF lists it despite the truncation


def test_openai_124m_first_tensor_reads_exactly(openai_124m_head):
    import tensorflow as tf

    name = "model/h0/attn/c_attn/b"
    bias = load_tf_checkpoint(openai_124m_head, names=[name], verify_crc=True)[name]  # OpenAI's own CRC
    assert bias.dtype == np.float32 and bias.shape == (2304,)
    published = np.array([0.48033914, -0.5254326, -0.42926455, -0.2059525, -0.1277338], np.float32)
    assert np.array_equal(bias[:5], published)
    # TensorFlow reads this tensor too: it lies wholly inside the 3 MiB head.
    assert bias.tobytes() == tf.train.load_variable(openai_124m_head, name).tobytes()


def test_openai_124m_tensors_past_the_head_are_reported_truncated(openai_124m_head):
    data_file = f"{openai_124m_head}{DATA}"
    readable = []
    for name in read_tf_index(openai_124m_head):
        try:
            load_tf_checkpoint(openai_124m_head, names=[name])
            readable.append(name)
        except GPT2Error as e:
            message = str(e)
            assert f"{data_file} is truncated: tensor {name!r}" in message and "download it again" in message
            assert "\n" not in message
    assert readable == ["model/h0/attn/c_attn/b"]  # as shared/README.md says of this head
    with pytest.raises(GPT2Error, match="is truncated: tensor 'model/h0/attn/c_attn/w'"):
        load_tf_checkpoint(openai_124m_head)


# ---------------------------------------------------------------------------------------------------
# Damaged TensorFlow checkpoints


def test_truncated_data_file_names_the_tensor_cut_off_and_keeps_the_rest_readable(fixture_model, tmp_path):
    prefix, params = copy_checkpoint(fixture_model, tmp_path)
    variables = tf_variables(params)
    cut = os.path.getsize(prefix + DATA) // 2
    os.truncate(prefix + DATA, cut)
    with pytest.raises(GPT2Error) as error:
        load_tf_checkpoint(prefix)
    message = str(error.value)
    assert f"{prefix}{DATA} is truncated: tensor " in message and "delete the file and download it again" in message
    entries = read_tf_index(prefix)
    named = message.split("tensor '")[1].split("'")[0]
    assert entries[named].offset + entries[named].size > cut
    inside = [name for name, entry in entries.items() if entry.offset + entry.size <= cut]
    assert inside, "half a checkpoint holds some whole tensors"
    for name, value in load_tf_checkpoint(prefix, names=inside).items():
        assert value.tobytes() == variables[name].tobytes(), name


def test_missing_data_file_is_a_clear_error(fixture_model, tmp_path):
    prefix, _ = copy_checkpoint(fixture_model, tmp_path)
    os.remove(prefix + DATA)
    with pytest.raises(GPT2Error, match=re.escape(f"cannot read {prefix}{DATA}")):
        load_tf_checkpoint(prefix)


def test_flipped_byte_in_an_index_block_fails_its_crc(fixture_model, tmp_path):
    prefix, _ = copy_checkpoint(fixture_model, tmp_path)
    flip_byte(prefix + ".index", 40)  # inside the first data block, which starts the file
    with pytest.raises(GPT2Error, match=r"index is damaged \(the block at byte 0 fails its CRC32C check\): delete"):
        read_tf_index(prefix)


def test_flipped_byte_in_the_footer_magic_is_refused(fixture_model, tmp_path):
    prefix, _ = copy_checkpoint(fixture_model, tmp_path)
    flip_byte(prefix + ".index", os.path.getsize(prefix + ".index") - 3)
    with pytest.raises(GPT2Error, match="is damaged .it does not end with the table magic number.: delete it"):
        load_tf_checkpoint(prefix)


def test_snappy_compressed_index_block_is_refused_clearly(fixture_model, tmp_path):
    prefix, _ = copy_checkpoint(fixture_model, tmp_path)
    index = bytearray(open(prefix + ".index", "rb").read())
    # Mark the first data block Snappy-compressed, with a CRC that matches, as a compressing writer would.
    footer = bytes(index[-checkpoint._FOOTER_SIZE :])
    _, _, pos = checkpoint._block_handle(footer, 0)
    index_offset, index_size, _ = checkpoint._block_handle(footer, pos)
    _, first_handle = next(checkpoint._block_entries(bytes(index[index_offset : index_offset + index_size])))
    offset, size, _ = checkpoint._block_handle(first_handle, 0)
    index[offset + size] = 1
    crc = checkpoint._masked(checkpoint._crc32c(bytes(index[offset : offset + size + 1])))
    index[offset + size + 1 : offset + size + 5] = crc.to_bytes(4, "little")
    open(prefix + ".index", "wb").write(index)
    with pytest.raises(GPT2Error, match=r"model\.ckpt\.index: compressed index not supported"):
        read_tf_index(prefix)


def test_flipped_byte_in_a_tensor_fails_its_crc_naming_the_tensor(fixture_model, tmp_path):
    prefix, params = copy_checkpoint(fixture_model, tmp_path)
    entry = read_tf_index(prefix)["model/h1/mlp/c_fc/w"]
    flip_byte(prefix + DATA, entry.offset + entry.size // 2)
    expected = f"{prefix}{DATA} is damaged: tensor 'model/h1/mlp/c_fc/w' fails its CRC32C check"
    with pytest.raises(GPT2Error, match=re.escape(expected)):
        load_tf_checkpoint(prefix, verify_crc=True)
    # Unchecked, the damage goes through: only the CRC check catches it.
    damaged = load_tf_checkpoint(prefix)["model/h1/mlp/c_fc/w"]
    assert damaged.tobytes() != tf_variables(params)["model/h1/mlp/c_fc/w"].tobytes()


# ---------------------------------------------------------------------------------------------------
# The protobuf decoding, against protobuf's own encoder

UNKNOWN_FIELDS = (
    b"\x78\x96\x01"  # field 15, varint 150
    + b"\x81\x01" + bytes(range(8))  # field 16, fixed 64-bit
    + b"\x8a\x01\x03abc"  # field 17, length-delimited
    + b"\x95\x01" + bytes(4)  # field 18, fixed 32-bit
)


@settings(max_examples=100, deadline=None)
@given(
    dtype=st.integers(0, 30),
    shape=st.lists(st.integers(0, 2**40), max_size=5),
    shard_id=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1),
    size=st.integers(0, 2**63 - 1),
    crc32c=st.integers(0, 2**32 - 1),
)
def test_bundle_entries_decode_as_protobuf_encodes_them_skipping_unknown_fields(
    dtype, shape, shard_id, offset, size, crc32c
):
    from tensorflow.core.protobuf import tensor_bundle_pb2

    proto = tensor_bundle_pb2.BundleEntryProto(dtype=dtype, shard_id=shard_id, offset=offset, size=size, crc32c=crc32c)
    for dim_size in shape:
        proto.shape.dim.add(size=dim_size)
    message = UNKNOWN_FIELDS + proto.SerializeToString() + UNKNOWN_FIELDS
    entry = checkpoint._parse_entry(message)
    assert entry == checkpoint.TensorEntry(dtype, tuple(shape), shard_id, offset, size, crc32c)


# ---------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_written_by_the_library_load_equal_and_zero_copy(fixture_model, tmp_path):
    import safetensors.numpy

    _, _, params = fixture_model("tiny")
    variables = tf_variables(params)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(variables, str(path), metadata={"format": "np"})
    tensors = load_safetensors(path)
    assert tensors.keys() == variables.keys()
    for name, value in tensors.items():
        assert type(value) is np.ndarray and not value.flags.writeable, name
        assert os.path.samefile(mapped_file(value), path), name
        assert value.dtype == np.float32 and value.shape == variables[name].shape, name
        assert value.tobytes() == variables[name].tobytes(), name


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_safetensors_upcast_as_torch_does(tmp_path, half):
    import safetensors.torch
    import torch

    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 1e-7, 3e38, float("inf"), float("-inf"), float("nan")]
    values = torch.cat([torch.tensor(special), torch.randn(4 * 6 * 5, generator=torch.Generator().manual_seed(0))])
    tensors = {"row": values.to(getattr(torch, half)), "block": values[:120].reshape(4, 6, 5).to(getattr(torch, half))}
    safetensors.torch.save_file(tensors, str(tmp_path / "half.safetensors"))
    loaded = load_safetensors(tmp_path / "half.safetensors")
    for name, tensor in tensors.items():
        expected = tensor.to(torch.float32).numpy()
        assert loaded[name].dtype == np.float32 and loaded[name].shape == expected.shape
        assert loaded[name].tobytes() == expected.tobytes(), name


def write_safetensors(path, header, data=bytes(24), header_size=None):
    """A safetensors file with any header: a dict (encoded as JSON) or raw bytes, and any claimed length."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(encoded) if header_size is None else header_size
    path.write_bytes(size.to_bytes(8, "little") + encoded + data)
    return path


# Two float32 tensors filling 24 data bytes: "a" the first 8, "b" the other 16.
GOOD = {"a": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}


def with_b(**lie):
    """GOOD, but tensor "b" says something else."""
    return {**GOOD, "b": {**GOOD["b"], **lie}}


@pytest.mark.parametrize(
    "header, header_size, message",
    [
        (GOOD, 10**6, "its header length 1000000 does not fit the file of 158 bytes"),
        (GOOD, 2**63, f"its header length {2**63} is over the 100000000-byte limit"),
        (b"{not json", None, "its header is not valid JSON"),
        (b"[1, 2]", None, "its header is not a JSON object"),
        (with_b(shape=[5], data_offsets=[8, 28]), None, r"tensor 'b' has data_offsets \[8, 28\] outside the 24 data bytes"),
        (with_b(data_offsets=[4, 20]), None, "tensors 'a' and 'b' overlap"),
        (with_b(shape=[3]), None, "tensor 'b' spans 16 bytes, which does not fit dtype F32 and shape"),
        (with_b(dtype="Q4"), None, "tensor 'b' has dtype 'Q4', not one of"),
        (with_b(shape=[-4]), None, r"tensor 'b' has shape \[-4\], not a list of sizes"),
        (with_b(data_offsets=[8]), None, r"tensor 'b' has data_offsets \[8\], not \[begin, end\]"),
    ],
)
def test_safetensors_with_a_lying_header_is_refused(tmp_path, header, header_size, message):
    path = write_safetensors(tmp_path / "bad.safetensors", header, header_size=header_size)
    with pytest.raises(GPT2Error, match=f"is not a valid safetensors file: {message}") as error:
        load_safetensors(path)
    assert str(path) in str(error.value) and "download it again" in str(error.value) and "\n" not in str(error.value)


def test_crafted_safetensors_read_back_their_bytes(tmp_path):
    # The same file as the lying ones, told the truth: the refusals above are not refusing everything.
    data = np.arange(6, dtype="<f4")
    tensors = load_safetensors(write_safetensors(tmp_path / "good.safetensors", GOOD, data.tobytes()))
    assert tensors["a"].shape == (2, 1) and np.array_equal(tensors["a"].ravel(), data[:2])
    assert tensors["b"].shape == (4,) and np.array_equal(tensors["b"], data[2:])


def test_safetensors_shorter_than_its_length_field_is_refused(tmp_path):
    path = tmp_path / "stub.safetensors"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(GPT2Error, match="does not fit the file of 2 bytes"):
        load_safetensors(path)


def test_crcs_kept_in_a_safetensors_file_are_zlibs_and_catch_a_flipped_byte(tmp_path):
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "transposed": rng.normal(size=(4, 6)).astype(np.float32).T}
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors, metadata={"note": "kept"}, crc32=True)
    with safe_open(path, "np") as f:  # still a file the safetensors library reads, metadata and all
        crcs = json.loads(f.metadata()["crc32"])
        assert f.metadata()["note"] == "kept"
        assert crcs == {name: f"{zlib.crc32(f.get_tensor(name).tobytes()):08x}" for name in tensors}
    for name, array in load_safetensors(path, verify_crc=True).items():
        assert np.array_equal(array, tensors[name]), name

    flip_byte(path, path.stat().st_size - 5)  # inside the last tensor
    with pytest.raises(GPT2Error, match=re.escape(f"{path} is damaged: tensor 'transposed' fails its CRC-32 check")):
        load_safetensors(path, verify_crc=True)


def test_verifying_a_safetensors_file_without_crcs_is_a_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"a": np.ones(3, np.float32)})
    with pytest.raises(GPT2Error, match="it holds no CRC-32 for each of its tensors"):
        load_safetensors(path, verify_crc=True)
