"""Parse and build safetensors headers without the safetensors package.

Written by hand because we need what `safetensors` does not give without reading or mapping the
whole file through a framework: the header alone (8-byte little-endian length + JSON), fetched with
two small range reads from any backend, with *absolute* byte offsets, and strict validation whose
errors name the file and tensor. The same module writes headers for split files, so the bytes of a
tensor are copied, never decoded.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from .errors import HeaderError

#: Bits per element of every dtype the safetensors format defines (sub-byte float types included).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}

#: The safetensors library refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000
LENGTH_BYTES = 8
#: Tensor sizes are computed exactly up to this many bytes, and reported as "more" past it.
SIZE_BOUND = 1 << 64


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's raw little-endian bytes are: `offset` is absolute within `file`."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def alignment(self) -> int:
        """Natural alignment in bytes (1 for sub-byte and byte types)."""
        return max(1, DTYPE_BITS[self.dtype] // 8)


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int | None:
    """Bytes of a tensor, or None when the element count does not fill whole bytes."""
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    return bits // 8 if bits % 8 == 0 else None


def _bounded_nbytes(dtype: str, shape: list[int], limit: int) -> int | None:
    """tensor_nbytes, but None as soon as the size passes `limit`: a header from the internet may
    hold a shape of a million huge dimensions, whose exact product would take minutes to compute."""
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count * DTYPE_BITS[dtype] > 8 * limit:
            return None
    return tensor_nbytes(dtype, [count])


def parse_length(prefix: bytes, *, file: str, file_size: int) -> int:
    """Decode and bound the header length from a file's first 8 bytes."""
    if file_size < LENGTH_BYTES or len(prefix) < LENGTH_BYTES:
        raise HeaderError(
            f"{file}: {file_size} bytes is too short for a safetensors file (needs an 8-byte "
            "header length); the file is truncated or not safetensors: re-download it."
        )
    (length,) = struct.unpack("<Q", prefix[:LENGTH_BYTES])
    if length > MAX_HEADER_BYTES:
        raise HeaderError(
            f"{file}: header length {length} exceeds the {MAX_HEADER_BYTES}-byte cap; the file is "
            "corrupt or not safetensors: re-download it."
        )
    if LENGTH_BYTES + length > file_size:
        raise HeaderError(
            f"{file}: header length {length} runs past the end of the {file_size}-byte file; the "
            "file is truncated: re-download it."
        )
    return length


def _short(value: Any, limit: int = 80) -> str:
    """repr for an error message, cut short: headers come from the internet and may hold
    megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError(f"duplicate key {_short(key)}")
        seen[key] = value
    return seen


def parse_header(
    header: bytes, *, file: str, file_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header's JSON and return its tensors (in data order) and `__metadata__`.

    Checks: JSON object, known dtype, shape of non-negative ints, 0 <= begin <= end, end inside the
    file, ranges not overlapping, and end - begin == prod(shape) * itemsize.
    """
    data_start = LENGTH_BYTES + len(header)
    data_size = file_size - data_start
    try:
        raw = json.loads(header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except HeaderError as exc:
        raise HeaderError(
            f"{file}: header has a {exc}; the file is corrupt: re-download it."
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: JSON nested thousands deep (no real header is nested more than 3 levels).
        raise HeaderError(
            f"{file}: header is not valid UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]}); the "
            "file is corrupt or not safetensors: re-download it."
        ) from None
    if not isinstance(raw, dict):
        raise HeaderError(
            f"{file}: header is JSON {type(raw).__name__}, expected an object; the file is not "
            "safetensors: re-download it."
        )
    metadata = raw.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError(
            f"{file}: __metadata__ must map strings to strings; the file is corrupt: "
            "re-download it."
        )

    spans: list[tuple[int, int, str]] = []
    infos: dict[str, TensorInfo] = {}
    for name, entry in raw.items():
        where = f"{file}: tensor {_short(name)}"
        if not isinstance(entry, dict):
            raise HeaderError(
                f"{where}: entry is not an object; the file is corrupt: re-download it."
            )
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise HeaderError(
                f"{where}: unknown dtype {_short(dtype, 40)} (known: {', '.join(DTYPE_BITS)}); "
                "the file is corrupt or from a newer safetensors: upgrade or re-download."
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise HeaderError(
                f"{where}: shape {_short(shape)} is not a list of non-negative integers; the "
                "file is corrupt: re-download it."
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise HeaderError(
                f"{where}: data_offsets {_short(offsets)} must be [begin, end] with "
                "0 <= begin <= end; the file is corrupt: re-download it."
            )
        begin, end = offsets
        if end > data_size:
            raise HeaderError(
                f"{where}: data_offsets end {end} is past the {data_size} data bytes of the file; "
                "the file is truncated: re-download it."
            )
        expected = _bounded_nbytes(dtype, shape, SIZE_BOUND)
        if expected != end - begin:
            needs = "more than 2**64" if expected is None else str(expected)
            shown = str(shape) if len(shape) <= 8 else f"{_short(shape)} ({len(shape)} dims)"
            raise HeaderError(
                f"{where}: {end - begin} bytes in data_offsets but shape {shown} of {dtype} needs "
                f"{needs}; the file is corrupt: re-download it."
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(
            name=name,
            file=file,
            dtype=dtype,
            shape=tuple(shape),
            offset=data_start + begin,
            nbytes=end - begin,
        )

    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in pairwise(spans):
        if begin < prev_end:
            raise HeaderError(
                f"{file}: tensors {_short(prev)} and {_short(name)} overlap in the data section; "
                "the file is corrupt: re-download it."
            )
    ordered = {name: infos[name] for _, _, name in spans}
    return ordered, metadata


def build_header(
    tensors: list[TensorInfo],
    metadata: dict[str, str] | None = None,
    *,
    data_start: tuple[int, int] | None = None,
) -> bytes:
    """Length prefix + JSON header for `tensors` laid out back to back in the given order.

    The JSON is padded with spaces (as the safetensors writer does) to a multiple of 8 bytes, or,
    with `data_start=(modulus, residue)`, until the data section starts at an offset congruent to
    `residue`: the split uses it to give copied bytes the page offset they had in the source, so
    that the kernel copies whole pages (copy_file_range is markedly slower between misaligned
    offsets).
    """
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    position = 0
    for info in tensors:
        entries[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [position, position + info.nbytes],
        }
        position += info.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    modulus, residue = data_start or (8, 0)
    body += b" " * ((residue - LENGTH_BYTES - len(body)) % modulus)
    return struct.pack("<Q", len(body)) + body
