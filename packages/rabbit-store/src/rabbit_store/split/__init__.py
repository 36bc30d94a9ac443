"""Split a checkpoint into one safetensors file per layer, resumably.

Byte copy: each output file is a header we build (same tensor names, dtypes and shapes) plus
the tensors' raw bytes copied from the source, never decoded; unless a `SplitTransform` (the
engine's compression) rewrites the tensors of the files it chooses. The output directory is itself a
sharded checkpoint (model.safetensors.index.json + config and tokenizer files) plus
`rabbit-split.json`. Atomic per file, resumable, lock-protected.

- layout.py: what each output file holds (names, tensor order, source runs, header);
- bytecopy.py: moving and hashing the bytes (copy_file_range + hashing threads, or chunked reads);
- resume.py: what an earlier run left and which of its files are kept (checked by ../verify.py);
- splitter.py: one run start to finish, and `split_checkpoint`;
- transform.py: the hook through which the engine rewrites tensors (compressed splits).

Checking a finished split (`verify_split`) lives in ../verify.py with the checks loading makes; it
is re-exported here because it has always been importable from `rabbit_store.split`.
"""

from __future__ import annotations

from ..verify import VerifyResult, verify_split
from .layout import AUX_PATTERNS, layer_file_name, output_order, source_runs
from .splitter import Splitter, split_checkpoint
from .transform import PlannedTensor, SplitTransform

__all__ = [
    "AUX_PATTERNS",
    "PlannedTensor",
    "SplitTransform",
    "Splitter",
    "VerifyResult",
    "layer_file_name",
    "output_order",
    "source_runs",
    "split_checkpoint",
    "verify_split",
]
