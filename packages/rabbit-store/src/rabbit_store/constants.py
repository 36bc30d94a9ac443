"""Facts every RabbitLLM package shares: environment variables, cache paths, file names, sizes.

Why one module: each of these used to be written in two packages, and two copies drift (one read
`~` expanded, the other not). Environment variables are read when a function is called, never at
import, so a process (a test, a notebook) that sets one later is still honoured.

This module imports nothing but the standard library, so any package, torch-free or not, can use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# -- environment variables -------------------------------------------------------------------------
#: RabbitLLM's cache directory (converted checkpoints, the default model, remote block caches).
CACHE_ENV = "RABBITLLM_CACHE"
#: The XDG base directory for caches; `$XDG_CACHE_HOME/rabbitllm` when RABBITLLM_CACHE is unset.
XDG_CACHE_ENV = "XDG_CACHE_HOME"
#: huggingface_hub's offline switch and cache location, re-read at call time (see hub_offline).
HF_HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"
HF_HUB_CACHE_ENV = "HF_HUB_CACHE"
#: A RabbitLLM source checkout for `rabbit bench` to run tools/rabbit_bench from, for installs that
#: are not inside one.
CHECKOUT_ENV = "RABBITLLM_CHECKOUT"

#: Values of a boolean environment variable that mean "on", compared case-insensitively: the set
#: huggingface_hub uses for HF_HUB_OFFLINE, so that both read the same variable the same way.
ENV_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """True when environment variable `name` is set to one of ENV_TRUE_VALUES (any case, spaces
    ignored); unset, empty or anything else is False."""
    value = (os.environ if environ is None else environ).get(name, "")
    return value.strip().upper() in ENV_TRUE_VALUES


def cache_root() -> Path:
    """RabbitLLM's cache directory: $RABBITLLM_CACHE, else $XDG_CACHE_HOME/rabbitllm, else
    ~/.cache/rabbitllm; read at call time, `~` expanded."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get(XDG_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / "rabbitllm"


def remote_cache_dir() -> Path:
    """Where `local_cache=True` keeps blocks of remote files: `remote/` under cache_root()."""
    return cache_root() / "remote"


# -- file names ------------------------------------------------------------------------------------
#: A sharded safetensors checkpoint's index, and the one file of an unsharded checkpoint.
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: A finished split's manifest, and the resume record written while a split runs.
MANIFEST_FILE = "rabbit-split.json"
PARTIAL_MANIFEST_FILE = "rabbit-split.partial.json"
#: Lock file of a split destination (a file lock locally, an exclusively created object remotely).
SPLIT_LOCK_FILE = ".rabbit-split.lock"
#: Suffix of a local file being written: `.NAME.<random>.incomplete`, renamed into place when whole.
TEMP_SUFFIX = ".incomplete"
#: The index of a sharded pickle (`torch.save`) checkpoint.
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"

# -- weight file kinds -----------------------------------------------------------------------------
SAFETENSORS_SUFFIX = ".safetensors"
#: `torch.save` files: unpickled only on request (allow_pickle=True), converted to safetensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
#: Weight formats that are never read; named in "only safetensors is supported" messages.
UNSUPPORTED_WEIGHT_SUFFIXES = (".gguf", ".ckpt", ".h5")
#: Every weight file that is not safetensors.
NON_SAFETENSORS_WEIGHT_SUFFIXES = PICKLE_SUFFIXES + UNSUPPORTED_WEIGHT_SUFFIXES

# -- sizes -----------------------------------------------------------------------------------------
#: Read size of a streamed sha256 (verification): large enough that hashing, not the calls,
#: sets the pace; small enough to stay far below any memory limit.
HASH_CHUNK = 16 * 1024 * 1024
#: Index files above this size are refused before reading (the largest real ones are a few MB).
MAX_INDEX_BYTES = 100_000_000

#: Bytes a transformed (compressed) split file aligns its data section to: what torch's CPU
#: allocator guarantees, and what the packed int8/int4 kernels were measured to need (a weight at
#: 8 mod 64 crashed `_weight_int8pack_mm` with a general protection fault).
TENSOR_ALIGNMENT = 64
