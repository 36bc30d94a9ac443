"""safetensors header parsing and building, checked against the safetensors library."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

from rabbit_store.errors import HeaderError, InvalidCheckpointError, RabbitError
from rabbit_store.safetensors_header import (
    MAX_HEADER_BYTES,
    TensorInfo,
    build_header,
    parse_header,
    parse_length,
    tensor_nbytes,
)


def parse(blob: bytes, name: str = "f.safetensors"):
    length = parse_length(blob[:8], file=name, file_size=len(blob))
    return parse_header(blob[8 : 8 + length], file=name, file_size=len(blob))


def raw_file(header: object, data: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def test_matches_safetensors_library():
    arrays = {
        "b": np.arange(6, dtype=np.float16).reshape(2, 3),
        "a": np.arange(4, dtype=np.float32),
        "c": np.array([1, -2], dtype=np.int8),
    }
    blob = save(arrays, metadata={"format": "pt"})
    infos, metadata = parse(blob)
    assert metadata == {"format": "pt"}
    for name, array in arrays.items():
        info = infos[name]
        assert info.shape == array.shape and info.nbytes == array.nbytes
        assert blob[info.offset : info.end] == array.tobytes()
    # data order, absolute offsets
    assert [i.offset for i in infos.values()] == sorted(i.offset for i in infos.values())


def test_error_hierarchy():
    assert issubclass(HeaderError, InvalidCheckpointError)
    assert issubclass(InvalidCheckpointError, RabbitError)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 1000) + b"{}", "runs past the end"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds the"),
        (raw_file("x"), "expected an object"),
        (struct.pack("<Q", 3) + b"{x}", "not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "not valid UTF-8 JSON"),
        (
            raw_file({"t": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unknown dtype 'F17'",
        ),
        (
            raw_file({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape [-1]",
        ),
        (
            raw_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
            "0 <= begin <= end",
        ),
        (
            raw_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
            "past the 4 data bytes",
        ),
        (
            raw_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape [2] of F32 needs 8",
        ),
        (
            raw_file(
                {
                    "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlap",
        ),
        (raw_file({"__metadata__": {"a": 1}}), "__metadata__ must map strings"),
        (raw_file({"t": 3}), "entry is not an object"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(blob: bytes, message: str):
    with pytest.raises(HeaderError) as err:
        parse(blob, "model-x.safetensors")
    assert message in str(err.value)
    assert "model-x.safetensors" in str(err.value)


def test_duplicate_keys_refused():
    entry = b'{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    body = b'{"t":' + entry + b',"t":' + entry + b"}"
    with pytest.raises(HeaderError, match="duplicate key 't'"):
        parse(struct.pack("<Q", len(body)) + body + b"\0")


def test_sub_byte_dtypes():
    assert tensor_nbytes("F4", [4]) == 2
    assert tensor_nbytes("F4", [3]) is None
    assert tensor_nbytes("BF16", [2, 3]) == 12


arrays_strategy = st.dictionaries(
    st.text(alphabet="abcdefgh._0123", min_size=1, max_size=12),
    st.tuples(
        st.sampled_from([np.float32, np.float16, np.int8, np.int64, np.uint8]),
        st.lists(st.integers(0, 4), max_size=3),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(spec=arrays_strategy)
def test_built_headers_load_in_safetensors(spec, tmp_path_factory):
    """build_header + raw bytes in that order is a file safetensors reads back identically."""
    rng = np.random.default_rng(0)
    arrays = {
        name: (rng.integers(0, 255, size=int(np.prod(shape)), dtype=np.uint8).view(np.uint8))
        .astype(dtype)
        .reshape(shape)
        for name, (dtype, shape) in spec.items()
    }
    dtype_names = {
        np.float32: "F32",
        np.float16: "F16",
        np.int8: "I8",
        np.int64: "I64",
        np.uint8: "U8",
    }
    infos = [
        TensorInfo(name, "src", dtype_names[spec[name][0]], tuple(a.shape), 0, a.nbytes)
        for name, a in arrays.items()
    ]
    header = build_header(infos, {"format": "pt"})
    assert (len(header) - 8) % 8 == 0
    blob = header + b"".join(arrays[i.name].tobytes() for i in infos)
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="np") as handle:
        assert sorted(handle.keys()) == sorted(arrays)
        for name, array in arrays.items():
            got = handle.get_tensor(name)
            assert got.dtype == array.dtype and got.shape == array.shape
            assert got.tobytes() == array.tobytes()
    parsed, metadata = parse(blob)
    assert metadata == {"format": "pt"}
    assert {n: (i.dtype, i.shape, i.nbytes) for n, i in parsed.items()} == {
        i.name: (i.dtype, i.shape, i.nbytes) for i in infos
    }
