"""Read GPT-2 checkpoints with nothing but NumPy: TensorFlow's tensor bundles and safetensors files.

Both formats are parsed by hand from their bytes; tensors come back as read-only views of a memory map (plain
ndarrays: see _mapped).
"""
import collections
import contextlib
import functools
import json
import math
import mmap
import os
import zlib

import numpy as np

from errors import GPT2Error
from files import disk_space_for


# Where a tensor lies in the data file; crc32c is kept masked, as the index stores it (see _masked).
TensorEntry = collections.namedtuple("TensorEntry", "dtype shape shard_id offset size crc32c")

# TensorFlow's DataType enum -> the little-endian NumPy dtype it is stored as.
_TF_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 9: "<i8", 19: "<f2"}
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles of up to 20 bytes each, zero-padded to 40, then the magic number
_BLOCK_TRAILER_SIZE = 5  # a compression-type byte and a masked CRC32C
_SNAPPY = 1


# ---------------------------------------------------------------------------------------------------
# CRC32C, vectorized. The CRC register changes linearly over GF(2): feeding data from a register r
# gives zeros(len(data))(r) XOR (the same data fed from register 0), and leading zero bytes leave a
# register of 0 at 0. So many lanes of a block can run side by side as NumPy arrays and be merged.

_POLY = 0x82F63B78  # Castagnoli's polynomial, bit-reversed as in every CRC32C implementation
_LANES = 16384  # how many slices of a block run side by side
_STEPS = 256  # how many 4-byte words each lane reads: lanes x steps x 4 = 16 MiB blocks


def _crc32c(data):
    """The CRC32C (Castagnoli) of a bytes-like object, at hundreds of MB/s."""
    data = np.frombuffer(data, np.uint8)
    register = 0xFFFFFFFF
    block_size = _LANES * _STEPS * 4
    for start in range(0, len(data), block_size):
        block = data[start : start + block_size]
        register = _shift(register, len(block)) ^ _crc_from_zero(block)
    return register ^ 0xFFFFFFFF


def _masked(crc):
    """The CRC as TensorFlow stores it: rotated and offset, since a CRC over bytes that hold CRCs is weak."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc_from_zero(block):
    """The CRC register after feeding block to a register of 0, with no final inversion."""
    words = -(-len(block) // 4)
    lanes = 1 << (-(-words // _STEPS) - 1).bit_length()  # a power of two, so lanes merge pairwise
    steps = -(-words // lanes)
    # Zeros in front of the block change nothing (see above), and make it fill lanes x steps words.
    padding = lanes * steps * 4 - len(block)
    if padding:
        block = np.concatenate([np.zeros(padding, np.uint8), block])
    lane_words = block.view("<u4").reshape(lanes, steps)
    low, high = _word_tables()
    registers = np.zeros(lanes, np.uint32)
    for column in lane_words.T:
        registers ^= column
        registers = low[registers & 0xFFFF] ^ high[registers >> 16]
    span = steps * 4
    while len(registers) > 1:  # each lane's register, moved past the lane after it, joins that lane's
        registers = _apply(_zeros(span), registers[0::2]) ^ registers[1::2]
        span *= 2
    return int(registers[0])


def _shift(register, n):
    """The register after n zero bytes."""
    return int(_apply(_zeros(n), np.array([register], np.uint32))[0])


def _apply(columns, registers):
    """A linear map on registers, given as the images of the 32 one-bit registers, applied to an array."""
    bits = (registers[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return np.bitwise_xor.reduce(columns * bits, axis=1)


@functools.lru_cache(maxsize=None)
def _zeros(n):
    """The map 'feed n zero bytes' on the register, built by repeated squaring."""
    if n == 1:
        register = np.uint32(1) << np.arange(32, dtype=np.uint32)
        for _ in range(8):
            register = (register >> 1) ^ np.where(register & 1, np.uint32(_POLY), np.uint32(0))
        return register
    half = _zeros(n // 2)
    both = _apply(half, half)
    return _apply(_zeros(1), both) if n % 2 else both


@functools.lru_cache(maxsize=None)
def _word_tables():
    """Lookup tables for feeding a 4-byte word: the map 'feed 4 zero bytes' on the low and high 16 bits.

    Feeding a word w to a register r gives zeros(4)(r XOR w), so one step per word is two lookups.
    """
    halves = np.arange(1 << 16, dtype=np.uint32)
    return _apply(_zeros(4), halves), _apply(_zeros(4), halves << 16)


# ---------------------------------------------------------------------------------------------------
# TensorFlow's checkpoint index: a LevelDB-format table whose values are serialized protobufs.


def read_tf_index(prefix):
    """Parse PREFIX.index -> {tensor name: TensorEntry}, in the order the index stores them."""
    path = f"{prefix}.index"
    try:
        with open(path, "rb") as f:
            index = f.read()
    except OSError as e:
        raise _cannot_read(path, e) from None
    return parse_tf_index(index, path)


def parse_tf_index(index, path):
    """The bytes of a checkpoint index (read from path) -> {tensor name: TensorEntry}."""
    try:
        records = {key.decode(): value for key, value in _table_entries(index, path)}
        if "" not in records:
            raise ValueError("it has no bundle header")
        shards, endianness = _parse_header(records.pop(""))
        parsed = {name: _parse_entry(value) for name, value in records.items()}
    except ValueError as e:
        raise GPT2Error(f"{path} is damaged ({e}): delete it and download the checkpoint again") from None
    if shards != 1:
        raise GPT2Error(
            f"{path} describes a checkpoint in {shards} shards, but only one-shard checkpoints (as OpenAI's) "
            "are supported: re-save it as a single shard"
        )
    if endianness != 0:
        raise GPT2Error(f"{path} describes a big-endian checkpoint; re-save it on a little-endian machine")
    entries = {}
    for name, entry in parsed.items():
        if entry.dtype not in _TF_DTYPES:
            raise GPT2Error(
                f"{path}: tensor {name!r} has TensorFlow dtype number {entry.dtype}, which this reader does not "
                f"support (it reads {sorted(_TF_DTYPES)}); convert the checkpoint to float32"
            )
        entry = entry._replace(dtype=np.dtype(_TF_DTYPES[entry.dtype]))
        if entry.shard_id != 0 or entry.size != math.prod(entry.shape) * entry.dtype.itemsize:
            raise GPT2Error(
                f"{path} is damaged: tensor {name!r} has an impossible shard or size; "
                "delete it and download the checkpoint again"
            )
        entries[name] = entry
    return entries


def load_tf_checkpoint(prefix, names=None, verify_crc=False):
    """The tensors of a one-shard TF checkpoint, as read-only views of a memory map of its data file.

    names= limits which tensors are checked and returned, so that the tensors lying wholly inside a
    truncated data file can still be read; verify_crc=True checks each tensor's CRC32C.
    """
    entries = read_tf_index(prefix)
    if names is not None:
        unknown = [name for name in names if name not in entries]
        if unknown:
            raise GPT2Error(
                f"{prefix}.index has no tensor {unknown[0]!r}: check the name against read_tf_index({str(prefix)!r})"
            )
        entries = {name: entries[name] for name in names}
    path = f"{prefix}.data-00000-of-00001"
    file_size = _file_size(path)
    for name, entry in entries.items():
        if entry.offset + entry.size > file_size:
            raise GPT2Error(
                f"{path} is truncated: tensor {name!r} ends at byte {entry.offset + entry.size} but the file has "
                f"only {file_size} bytes; the download is incomplete, delete the file and download it again"
            )
    if not file_size:  # mmap cannot map an empty file, and no real checkpoint has one
        raise GPT2Error(f"{path} is empty: the download is incomplete, delete the file and download it again")
    data = _mapped(path)
    tensors = {}
    for name, entry in entries.items():
        raw = data[entry.offset : entry.offset + entry.size]
        if verify_crc and _masked(_crc32c(raw)) != entry.crc32c:
            raise GPT2Error(
                f"{path} is damaged: tensor {name!r} fails its CRC32C check; delete the file and download it again"
            )
        tensors[name] = raw.view(entry.dtype).reshape(entry.shape)
    return tensors


def _mapped(path):  # -> the bytes of the file at path, read-only: a plain ndarray view of a memory map of it
    # not the np.memmap itself: its Python hooks run on every view of its arrays and every product with them (a
    # weight's .T took 0.7 µs instead of 0.07, a one-row product 1.7 µs more); the view keeps the map alive
    mapped = np.memmap(path, np.uint8, mode="r")
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Pages of 2 MiB where the kernel can give a file's pages in them (Linux, on file systems with large folios,
        # as ext4 and XFS have): a product streams through its weights, which in 4 KiB pages take a TLB entry for
        # every 4 KiB of them. Loaded from an empty page cache with this advice, 99 % of 1558M's weights came
        # in such pages, without it 15-25 %, and a token took 251-261 ms against 290-295 (124M: 97 % against 73 %,
        # 21.3-21.9 ms against 22.7-23.5; Intel Xeon, Linux 6.18, ext4)
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages refuses the advice
            mapped._mmap.madvise(mmap.MADV_HUGEPAGE)
    return np.asarray(mapped)


def mapped_file(array):  # -> the path of the file whose memory map array is a view of, or None if it is no such view
    while isinstance(array, np.ndarray) and not isinstance(array, np.memmap):
        array = array.base
    return getattr(array, "filename", None)


def _table_entries(index, path):
    """Yield (key, value) for every entry of a LevelDB-format table, reading it front to back."""
    if len(index) < _FOOTER_SIZE or int.from_bytes(index[-8:], "little") != _TABLE_MAGIC:
        raise ValueError("it does not end with the table magic number")
    footer = index[-_FOOTER_SIZE:]
    _, _, pos = _block_handle(footer, 0)  # the metaindex block, which TensorFlow leaves empty
    index_offset, index_size, _ = _block_handle(footer, pos)
    for _, handle in _block_entries(_read_block(index, index_offset, index_size, path)):
        data_offset, data_size, _ = _block_handle(handle, 0)
        yield from _block_entries(_read_block(index, data_offset, data_size, path))


def _block_handle(buf, pos):
    """Decode a block handle (offset and size varints) at pos -> (offset, size, position after it)."""
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _read_block(index, offset, size, path):
    """The contents of the table block at offset, once its CRC (over contents and type byte) checks out."""
    end = offset + size + _BLOCK_TRAILER_SIZE
    if end > len(index) - _FOOTER_SIZE:
        raise ValueError(f"a block at byte {offset} runs past the end of the file")
    stored_crc = int.from_bytes(index[offset + size + 1 : end], "little")
    if _masked(_crc32c(index[offset : offset + size + 1])) != stored_crc:
        raise ValueError(f"the block at byte {offset} fails its CRC32C check")
    compression = index[offset + size]
    if compression == _SNAPPY:
        raise GPT2Error(
            f"{path}: compressed index not supported (its blocks are Snappy-compressed); "
            "re-save the checkpoint with TensorFlow's default, uncompressed bundle writer"
        )
    if compression != 0:
        raise ValueError(f"the block at byte {offset} has unknown compression type {compression}")
    return index[offset : offset + size]


def _block_entries(block):
    """Yield (key, value) for each entry of a block; a key is stored as what differs from the key before it."""
    if len(block) < 4:
        raise ValueError("a block is too short to hold its restart count")
    # The restart array at the end only speeds up seeking; a front-to-back read skips it.
    end = len(block) - 4 - 4 * int.from_bytes(block[-4:], "little")
    if end < 0:
        raise ValueError("a block's restart array is longer than the block")
    key, pos = b"", 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_size > end:
            raise ValueError(f"a block entry at byte {pos} does not fit its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size


def _parse_header(value):
    """A BundleHeaderProto -> (num_shards, endianness), with proto3's zero defaults."""
    fields = dict(_fields(value, {1: 0, 2: 0}))
    return fields.get(1, 0), fields.get(2, 0)


def _parse_entry(value):
    """A BundleEntryProto -> TensorEntry, its dtype still TensorFlow's enum number."""
    fields = {1: 0, 2: b"", 3: 0, 4: 0, 5: 0, 6: 0}  # proto3 leaves out fields that hold their zero default
    for number, field in _fields(value, {1: 0, 2: 2, 3: 0, 4: 0, 5: 0, 6: 5, 7: 2}):
        if number == 7:
            raise ValueError("it holds a partitioned tensor, which this reader does not support")
        fields[number] = field
    shape = tuple(dict(_fields(dim, {1: 0})).get(1, 0) for _, dim in _fields(fields[2], {2: 2}))
    if any(size >= 1 << 63 for size in shape):  # a negative int64: a dimension of unknown size
        raise ValueError("a tensor has a dimension of unknown size")
    return TensorEntry(fields[1], shape, fields[3], fields[4], fields[5], fields[6])


def _fields(message, wire_types):
    """Yield (field number, value) for the fields of a protobuf message named in wire_types; skip the rest.

    wire_types maps field number -> wire type: 0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit.
    """
    pos = 0
    while pos < len(message):
        tag, pos = _varint(message, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(message, pos)
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value, pos = int.from_bytes(_take(message, pos, width), "little"), pos + width
        elif wire_type == 2:
            size, pos = _varint(message, pos)
            value, pos = _take(message, pos, size), pos + size
        else:
            raise ValueError(f"a protobuf field has wire type {wire_type}, which a bundle never uses")
        if number in wire_types:
            if wire_types[number] != wire_type:
                raise ValueError(f"protobuf field {number} has wire type {wire_type}, not {wire_types[number]}")
            yield number, value


def check_protobuf(message):
    """Raise ValueError unless message is well-formed protobuf at its top level (tags, lengths and varints)."""
    for _ in _fields(message, {}):
        pass


def _varint(buf, pos):
    """Decode the base-128 varint at pos -> (value, position after it)."""
    value = 0
    for shift in range(0, 70, 7):
        byte = _take(buf, pos, 1)[0]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise ValueError(f"a varint ending at byte {pos} is longer than 10 bytes")


def _take(buf, pos, size):
    """buf[pos:pos + size], refusing to run past the end."""
    if pos + size > len(buf):
        raise ValueError(f"a field at byte {pos} runs past the end of its record")
    return buf[pos : pos + size]


# ---------------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header length, a JSON header, then the raw little-endian data.

_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # bfloat16 is read as its bits
_MAX_HEADER_SIZE = 100_000_000  # the safetensors library's own limit; more means a damaged length


def load_safetensors(path, verify_crc=False):
    """Every tensor of a .safetensors file as float32: F32 is a zero-copy view, F16 and BF16 are upcast.

    verify_crc=True checks each tensor against the CRC-32 that save_safetensors(crc32=True) recorded.
    """
    header, metadata, data_start = _safetensors_header(path)
    raw_tensors = _raw_tensors(path, header, data_start)
    if verify_crc:
        damaged = _first_damaged(raw_tensors, _recorded_crcs(path, header, metadata))
        if damaged is not None:
            raise GPT2Error(f"{path} is damaged: tensor {damaged!r} fails its CRC-32 check; delete the file and "
                            "write it again")
    tensors = {}
    for name, raw in raw_tensors.items():
        info = header[name]
        raw = raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # a bfloat16 is the high half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.astype(np.float32, copy=False)
    return tensors


def damaged_tensor(path):
    """The name of the first tensor of a .safetensors file that fails the CRC-32 save_safetensors(crc32=True) recorded
    for it; None when every one passes, or when the file records none (Hugging Face's files, say)."""
    header, metadata, data_start = _safetensors_header(path)
    if not (isinstance(metadata, dict) and "crc32" in metadata):
        return None
    return _first_damaged(_raw_tensors(path, header, data_start), _recorded_crcs(path, header, metadata))


def _raw_tensors(path, header, data_start):  # -> name -> the tensor's bytes, a view of a memory map of the file
    data = _mapped(path)  # the whole file: never empty, unlike its data part
    return {name: data[data_start + info["data_offsets"][0] : data_start + info["data_offsets"][1]]
            for name, info in header.items()}


def _first_damaged(raw_tensors, crcs):  # -> the name of the first tensor whose bytes fail their CRC-32, or None
    return next((name for name, raw in raw_tensors.items() if f"{zlib.crc32(raw):08x}" != crcs[name]), None)


def safetensors_metadata(path):
    """The strings a .safetensors file keeps in its header's __metadata__ ({} if it has none)."""
    metadata = _safetensors_header(path)[1]
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise _bad_safetensors(path, "its __metadata__ is not an object of strings")
    return metadata


def _safetensors_header(path):
    """(name -> dtype, shape and data_offsets, each checked against the file; the metadata; where the data starts)."""
    file_size = _file_size(path)
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > _MAX_HEADER_SIZE:
            raise _bad_safetensors(path, f"its header length {header_size} is over the {_MAX_HEADER_SIZE}-byte limit")
        if file_size < 8 or 8 + header_size > file_size:
            raise _bad_safetensors(path, f"its header length {header_size} does not fit the file of {file_size} bytes")
        header = f.read(header_size)
    try:
        header = json.loads(header)
    except (ValueError, RecursionError):  # RecursionError: brackets nested deeper than Python recurses
        raise _bad_safetensors(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad_safetensors(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    data_start = 8 + header_size
    data_size = file_size - data_start
    spans = sorted(_safetensors_span(path, name, info, data_size) + (name,) for name, info in header.items())
    for (_, end, before), (begin, _, after) in zip(spans, spans[1:]):
        if begin < end:
            raise _bad_safetensors(path, f"tensors {before!r} and {after!r} overlap")
    return header, metadata, data_start


def _recorded_crcs(path, header, metadata):
    """name -> the CRC-32 (8 hex digits) that save_safetensors(crc32=True) kept for each tensor of header."""
    try:
        crcs = json.loads(metadata["crc32"])
    except (TypeError, KeyError, ValueError):
        crcs = None
    if not isinstance(crcs, dict) or crcs.keys() != header.keys():
        raise _bad_safetensors(path, "it holds no CRC-32 for each of its tensors")
    return crcs


def save_safetensors(path, tensors, metadata=None, crc32=False):
    """Write tensors (name -> float32 array) as a .safetensors file, atomically: a reader, or a kill at any moment,
    sees the old file or the new one, never half of one. metadata: a dict of strings kept in the header.
    crc32=True also keeps each tensor's CRC-32 there (zlib's, ~20x faster than our CRC32C in NumPy), which
    load_safetensors(verify_crc=True) checks."""
    entries, offset = {}, 0
    for name, array in tensors.items():
        size = array.size * 4
        entries[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        offset += size
    # A CRC is known only once its tensor is written: the header goes first with placeholders of the same
    # length (8 hex digits), and is written again over itself at the end
    crcs = dict.fromkeys(tensors, "0" * 8)

    def header():
        extra = dict(metadata or {}, **({"crc32": json.dumps(crcs)} if crc32 else {}))
        encoded = json.dumps(entries | ({"__metadata__": extra} if extra else {}), separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format asks that the data start 8-byte aligned
        return len(encoded).to_bytes(8, "little") + encoded

    temporary = f"{path}.{os.getpid()}"
    with disk_space_for(path, len(header()) + offset):
        try:
            with open(temporary, "wb") as f:
                f.write(header())
                for name, array in tensors.items():
                    data = np.ascontiguousarray(array, dtype="<f4")
                    if crc32:
                        crcs[name] = f"{zlib.crc32(data):08x}"
                    f.write(data.data)
                if crc32:
                    f.seek(0)
                    f.write(header())
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename below makes it the file
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def _safetensors_span(path, name, info, data_size):
    """Check one header entry against the data part -> (begin, end) of its bytes there."""
    dtype = info.get("dtype") if isinstance(info, dict) else None
    if dtype not in _SAFETENSORS_DTYPES:
        raise _bad_safetensors(path, f"tensor {name!r} has dtype {dtype!r}, not one of {sorted(_SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise _bad_safetensors(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(offset) is int for offset in offsets):
        raise _bad_safetensors(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _bad_safetensors(path, f"tensor {name!r} has data_offsets {offsets} outside the {data_size} data bytes")
    if end - begin != math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize:
        why = f"tensor {name!r} spans {end - begin} bytes, which does not fit dtype {dtype} and shape {shape}"
        raise _bad_safetensors(path, why)
    return begin, end


def _bad_safetensors(path, why):
    return GPT2Error(f"{path} is not a valid safetensors file: {why}; export or download it again")


def _file_size(path):
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise _cannot_read(path, e) from None


def _cannot_read(path, error):
    return GPT2Error(f"cannot read {path} ({error.strerror}): check the path, or download the checkpoint again")
