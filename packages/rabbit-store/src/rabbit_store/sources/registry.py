"""Which backend opens a location: scheme -> opener, each implementation imported on first use.

Modelled on fsspec's `registry.py`: the table holds dotted paths ("module:function"), so this
module imports no backend, adding one never creates an import cycle, and huggingface_hub is loaded
only when a hub repo is opened. `register_opener` adds a backend (a callable or a dotted path);
schemes that no entry names go to fsspec when fsspec knows them, and are refused otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from ..errors import InvalidOptionError, MissingDependencyError, UnknownSchemeError
from .base import SCHEME, Source, display_url

logger = logging.getLogger(__name__)

Opener = Callable[..., Source]

#: A bare `org/name` (no scheme) that is not an existing local path is taken for a hub repo id.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: Scheme key of plain local paths, and of chained fsspec URLs (`blockcache::s3://...`).
LOCAL = ""
CHAINED = "chained"
#: Opener of every scheme fsspec knows and no entry below names.
FSSPEC_OPENER = "rabbit_store.sources.fsspec_source:open_fsspec"

#: scheme -> opener, or the "module:function" path of one (replaced by the function once imported).
_OPENERS: dict[str, Opener | str] = {
    LOCAL: "rabbit_store.sources.local:open_local",
    "hf": "rabbit_store.sources.hub:open_hub",
    CHAINED: FSSPEC_OPENER,
}


def register_opener(scheme: str, opener: Opener | str) -> None:
    """Add (or replace) the backend of `scheme://` locations: a callable
    `opener(location, *, revision, token, storage_options, cache_dir, local_cache) -> Source`, or
    its "module:function" path, imported when a location with that scheme is first opened."""
    _OPENERS[scheme.lower()] = opener


def scheme_of(location: str) -> str:
    """The registry key of a location: its lower-case scheme, CHAINED for `a::b://...`, "hf" for
    a bare `org/name` that is not a local path, LOCAL for any other path."""
    match = SCHEME.match(location)
    if match and match.group(2) == "::":
        return CHAINED  # fsspec resolves the chain
    if match:
        return match.group(1).lower()
    if not os.path.exists(os.path.expanduser(location)) and HUB_REPO_ID.match(location):
        return "hf"
    return LOCAL


def _fsspec_knows(scheme: str) -> bool:
    from fsspec.registry import known_implementations, registry

    return scheme in known_implementations or scheme in registry


def _import(path: str, scheme: str, location: str) -> Opener:
    module_name, _, attribute = path.partition(":")
    try:
        opener = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise MissingDependencyError(
            f"{display_url(location)}: the opener {path!r} registered for {scheme!r} cannot be "
            f"imported ({type(exc).__name__}: {exc}); install the package that provides it."
        ) from exc
    if not callable(opener):
        raise InvalidOptionError(
            f"{display_url(location)}: {path!r}, registered for {scheme!r}, is not callable."
        )
    return opener


def get_opener(scheme: str, location: str) -> Opener:
    """The opener of `scheme`, imported now if this is its first use; `location` names the URL in
    the error when no backend serves the scheme."""
    entry = _OPENERS.get(scheme)
    if entry is None:
        if not _fsspec_knows(scheme):
            known = ", ".join(sorted(s for s in _OPENERS if s not in (LOCAL, CHAINED)))
            raise UnknownSchemeError(
                f"{display_url(location)}: no backend for the scheme {scheme!r} (rabbit_store "
                f"knows {known} and local paths; fsspec knows none by that name either); check "
                f"the URL, install the fsspec implementation of {scheme!r}, or "
                f"register_opener({scheme!r}, ...)."
            )
        entry = FSSPEC_OPENER
    if isinstance(entry, str):
        opener = _import(entry, scheme, location)
        if _OPENERS.get(scheme) == entry:
            _OPENERS[scheme] = opener  # imported once, as fsspec's registry does
        return opener
    return entry


def open_source(
    location: str | os.PathLike[str] | Source,
    *,
    revision: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    local_cache: bool | str | os.PathLike[str] = False,
) -> Source:
    """Resolve a model location into a Source.

    `location`: a local directory, `org/name` or `hf://org/name[@revision]` (hub; `token`, HF_TOKEN,
    the hub cache and HF_HUB_OFFLINE are honoured), `s3://bucket/prefix` (s3fs; `storage_options`
    such as endpoint_url, key, secret), or any other fsspec URL. `local_cache` (True or a directory)
    keeps blocks read from a remote store on local disk. A Source is returned unchanged.
    """
    if isinstance(location, Source):
        return location
    location = os.fspath(location)
    scheme = scheme_of(location)
    if scheme not in ("hf", LOCAL) and token is not None:
        logger.debug("token= is for hub repos; ignored for %s", display_url(location))
    return get_opener(scheme, location)(
        location,
        revision=revision,
        token=token,
        storage_options=storage_options,
        cache_dir=cache_dir,
        local_cache=local_cache,
    )
