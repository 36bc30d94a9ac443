"""The safetensors header parser under hostile input: random bytes and mutations of valid files.

Only HeaderError may come out (never a TypeError, RecursionError, ...), nothing hangs (each example
has a deadline), and no read or allocation is sized by an unchecked length: through
CheckpointIndex.load, every range read stays inside the file and under the header cap.
"""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from rabbit_store import CheckpointIndex, FsspecSource
from rabbit_store.errors import HeaderError, InvalidCheckpointError
from rabbit_store.safetensors_header import (
    LENGTH_BYTES,
    MAX_HEADER_BYTES,
    parse_header,
    parse_length,
)

FUZZ = settings(max_examples=250, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

VALID = save(
    {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.arange(4, dtype=np.float16),
        "c": np.array([1, -2, 3], dtype=np.int8),
    },
    metadata={"format": "pt"},
)
VALID_LENGTH = struct.unpack("<Q", VALID[:8])[0]
VALID_HEADER = json.loads(VALID[8 : 8 + VALID_LENGTH])


def parse(blob: bytes):
    """What CheckpointIndex does per file: bounded length, then the header; checks the result."""
    length = parse_length(blob[:LENGTH_BYTES], file="f.safetensors", file_size=len(blob))
    infos, metadata = parse_header(
        blob[LENGTH_BYTES : LENGTH_BYTES + length], file="f.safetensors", file_size=len(blob)
    )
    data_start = LENGTH_BYTES + length
    for info in infos.values():  # whatever is accepted lies inside the data section
        assert data_start <= info.offset <= info.end <= len(blob)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    return infos


def only_header_errors(blob: bytes) -> None:
    try:
        parse(blob)
    except HeaderError as exc:
        assert "f.safetensors" in str(exc) and len(str(exc)) < 2000


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(blob: bytes):
    only_header_errors(blob)


@FUZZ
@given(body=st.binary(max_size=400), tail=st.binary(max_size=64))
def test_random_header_bodies_with_a_consistent_length(body: bytes, tail: bytes):
    only_header_errors(struct.pack("<Q", len(body)) + body + tail)


@FUZZ
@given(st.data())
def test_byte_mutations_of_a_valid_file(data):
    blob = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "length"]))
        if not blob:
            break
        at = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set":
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[at:]
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del blob[at : at + data.draw(st.integers(1, 16))]
        else:
            blob[:8] = struct.pack(
                "<Q",
                data.draw(
                    st.sampled_from([0, 1, 2**60, 2**64 - 1, MAX_HEADER_BYTES + 1])
                    | st.integers(0, 2**64 - 1)
                ),
            )
    only_header_errors(bytes(blob))


@FUZZ
@given(st.data())
def test_structural_mutations_of_a_valid_header(data):
    header = json.loads(json.dumps(VALID_HEADER))
    target = data.draw(st.sampled_from(["a", "b", "c", "__metadata__", "new"]))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole", "extra"]))
    value = data.draw(json_values)
    if target == "new":
        header[data.draw(st.text(max_size=6))] = value
    elif target == "__metadata__" or field == "whole":
        header[target] = value
    elif field == "extra":
        header[target]["extra"] = value
    else:
        header[target][field] = value
    body = json.dumps(header).encode()
    data_bytes = VALID[8 + VALID_LENGTH :]
    only_header_errors(struct.pack("<Q", len(body)) + body + data_bytes)


class RecordingFS(MemoryFileSystem):
    """memory:// that records every range asked of it (the test's window on what the store
    reads)."""

    protocol = ("rabbitfuzz",)
    cachable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranges: list[tuple[str, int | None, int | None]] = []
        self._batched = False

    def cat_ranges(self, paths, starts, ends, **kwargs):
        self.ranges.extend(zip(paths, starts, ends, strict=True))
        self._batched = True  # the base class serves a batch through cat_file: record it once
        try:
            return super().cat_ranges(paths, starts, ends, **kwargs)
        finally:
            self._batched = False

    def cat_file(self, path, start=None, end=None, **kwargs):
        if not self._batched:
            self.ranges.append((path, start, end))
        return super().cat_file(path, start, end, **kwargs)


def load_recorded(blob: bytes, root: str) -> tuple[RecordingFS, Exception | None]:
    fs = RecordingFS()
    fs.pipe_file(f"{root}/model.safetensors", blob)
    try:
        CheckpointIndex.load(FsspecSource(fs, root))
    except InvalidCheckpointError as exc:
        assert isinstance(exc, HeaderError), exc
        return fs, exc
    return fs, None


def assert_bounded_reads(fs: RecordingFS, size: int) -> None:
    for _, start, end in fs.ranges:
        assert start is not None and end is not None
        assert 0 <= start <= end <= size and end - start <= MAX_HEADER_BYTES


@settings(max_examples=120, deadline=2000)
@given(prefix=st.integers(0, 2**64 - 1), rest=st.binary(max_size=200))
def test_index_reads_stay_inside_the_file(prefix: int, rest: bytes):
    blob = struct.pack("<Q", prefix) + rest
    root = f"/fuzz-{prefix}-{len(rest)}"
    fs, _ = load_recorded(blob, root)
    assert_bounded_reads(fs, len(blob))
    fs.rm(root, recursive=True)


def test_a_header_claiming_2_to_the_60_bytes_is_refused_after_reading_8():
    blob = struct.pack("<Q", 2**60) + b'{"t": {}}'
    fs, error = load_recorded(blob, "/huge-claim")
    assert (
        isinstance(error, HeaderError)
        and "model.safetensors" in str(error)
        and "exceeds" in str(error)
    )
    assert [(s, e) for _, s, e in fs.ranges] == [(0, 8)]  # the length prefix only; no header read


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 200_000, "not valid UTF-8 JSON"),  # RecursionError inside json: still a HeaderError
        (
            b'{"t": {"dtype": [1], "shape": [1], "data_offsets": [0, 1]}}',
            "unknown dtype",
        ),  # unhashable
        (b'{"t": {"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 1]}}', "unknown dtype"),
        (
            b'{"__metadata__": [], "t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
            "__metadata__",
        ),
        (b'{"t": {"dtype": "U8", "shape": [1e400], "data_offsets": [0, 1]}}', "shape"),
        (
            b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}",
            "not valid UTF-8 JSON",
        ),
    ],
)
def test_hostile_headers_found_by_fuzzing(body: bytes, message: str):
    with pytest.raises(HeaderError, match=message):
        parse(struct.pack("<Q", len(body)) + body + b"\0")


def test_a_shape_of_a_million_huge_dimensions_is_refused_quickly():
    body = json.dumps(
        {"t": {"dtype": "F32", "shape": [2**62] * 300_000, "data_offsets": [0, 4]}}
    ).encode()
    started = time.monotonic()
    with pytest.raises(HeaderError, match=r"needs more than 2\*\*64") as err:
        parse(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    assert time.monotonic() - started < 5
    assert len(str(err.value)) < 500  # the shape is not copied into the message
