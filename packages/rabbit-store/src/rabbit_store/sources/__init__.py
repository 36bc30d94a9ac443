"""Where a checkpoint's files live: one Source protocol, backends chosen by URL scheme.

Shaped like fsspec (and built on it): `open_source` looks at the scheme of a location and hands it
to the opener registered for that scheme (registry.py, which imports each backend on first use);
everything above (index, reader, split, verify) talks to the `Source` protocol only. A new backend
is a new opener, not an `if` elsewhere.

- base.py: the Source protocol, safe relative names, credential-free display URLs;
- retry.py: which failures are retried (with backoff) and which RabbitError each becomes;
- fsspec_source.py: local directories, `file://`, `memory://`, `s3://` (s3fs), chained URLs
  (`blockcache::s3://...`) and every other fsspec protocol;
- local.py: plain local paths; hub.py: hub repos (`org/name`, `hf://org/name[@revision]`).

The hub backend is not imported here: huggingface_hub loads only when a hub repo is opened.
"""

from __future__ import annotations

from .base import Source, display_url, relative_name
from .fsspec_source import FsspecSource, default_remote_cache_dir
from .registry import HUB_REPO_ID, Opener, get_opener, open_source, register_opener, scheme_of
from .retry import (
    NO_SPACE_ERRNOS,
    READ_ATTEMPTS,
    TRANSIENT_ERRNOS,
    is_transient,
    storage_errors,
    with_retries,
)

__all__ = [
    "HUB_REPO_ID",
    "NO_SPACE_ERRNOS",
    "READ_ATTEMPTS",
    "TRANSIENT_ERRNOS",
    "FsspecSource",
    "Opener",
    "Source",
    "default_remote_cache_dir",
    "display_url",
    "get_opener",
    "is_transient",
    "open_source",
    "register_opener",
    "relative_name",
    "scheme_of",
    "storage_errors",
    "with_retries",
]
