"""The hook through which a split rewrites tensors instead of copying them (compressed splits).

rabbit_store stays torch-free: it plans, writes, hashes and resumes the files; the engine
(`rabbit_engine.quant`) implements `SplitTransform` and does the arithmetic. The splitter asks the
transform, file by file, which tensors the file holds (`outputs`) and then for their bytes
(`produce`), checks each chunk against the plan, and records `record` as the manifest's
`compression` so that a reader knows how to restore the tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..safetensors_header import TensorInfo, tensor_nbytes

__all__ = ["PlannedTensor", "SplitTransform"]


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a transformed split file, as its header will describe it."""

    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes `produce` must yield for this tensor (0 for a shape that fills no whole byte,
        which the splitter refuses)."""
        return tensor_nbytes(self.dtype, self.shape) or 0


class SplitTransform(Protocol):
    """Rewrites some split files' tensors (e.g. packs decoder-layer weights to int8/int4)."""

    @property
    def record(self) -> dict[str, Any]:
        """Stored as Manifest.compression; a resume whose previous record differs rewrites
        everything (the files on disk were made by another transform)."""
        ...

    def outputs(
        self, part: str, layer: int | None, infos: list[TensorInfo]
    ) -> list[PlannedTensor] | None:
        """The tensors of this split file in file order, or None to copy `infos` byte for byte."""
        ...

    def produce(
        self,
        part: str,
        layer: int | None,
        infos: list[TensorInfo],
        read: Callable[[TensorInfo], memoryview | bytes],
    ) -> Iterator[bytes | memoryview]:
        """The data of each planned tensor, in the order `outputs` gave, one chunk per tensor.

        `read(info)` returns a source tensor's raw little-endian bytes (a memoryview of the
        source's map when it is local: valid only until the file is finished).
        """
        ...
