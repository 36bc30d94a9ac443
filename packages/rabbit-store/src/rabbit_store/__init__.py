"""Torch-free safetensors checkpoints over fsspec: open a source (local, hub, S3, any fsspec URL),
index its tensors from the headers, plan them by decoder layer, read layers as raw bytes, split a
checkpoint into one file per layer. See docs/CONTRACTS.md for the engine-facing API."""

from .errors import RabbitError
from .index import CheckpointIndex
from .manifest import Manifest
from .plan import LayerPlan
from .reader import LayerReader
from .safetensors_header import TensorInfo
from .sources import FsspecSource, Source, open_source, register_opener
from .split import split_checkpoint
from .verify import VerifyResult, verify_split

__all__ = [
    "CheckpointIndex",
    "FsspecSource",
    "LayerPlan",
    "LayerReader",
    "Manifest",
    "RabbitError",
    "Source",
    "TensorInfo",
    "VerifyResult",
    "open_source",
    "register_opener",
    "split_checkpoint",
    "verify_split",
]
