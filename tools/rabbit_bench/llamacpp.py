"""llama.cpp as a peer engine: its CPU library (the `llama-cpp-py-sync` wheel's, CFFI) made
loadable here, and a model that decodes token by token with it.

The wheel's shared libraries are built against glibc 2.38 and need four of its symbols
(`__isoc23_strtol` and kin: the C23 spellings of strtol/sscanf, which only add "0b" prefixes)
that older glibcs lack. On such a machine `runtime_dir` copies the libraries, marks their version
need on GLIBC_2.38 *weak* in the ELF `.gnu.version_r` section (so the loader does not refuse them)
and compiles a small shim defining the missing symbols, loaded RTLD_GLOBAL before the libraries:
their relocations then bind to it. Nothing in the installed package is modified.

Weights are memory-mapped (llama.cpp's default, and how it streams a model bigger than memory)
with its CPU "extra buffer types" off: they would repack Q4_0 weights into anonymous memory at
load time (OOM under the cold regime's cap) instead of reading them from the file.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from array import array
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llama_cpp_py_sync"
#: The glibc version whose symbols the wheel's libraries need, and those symbols (all forwarded
#: to their pre-C23 equivalents, which differ only in not accepting "0b" binary prefixes).
NEEDED_GLIBC = "GLIBC_2.38"
SHIM_SOURCE = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) {
    va_list ap; va_start(ap, f); int r = vsscanf(s, f, ap); va_end(ap); return r;
}
int __isoc23_vsscanf(const char *s, const char *f, va_list ap) { return vsscanf(s, f, ap); }
"""
SHT_GNU_VERNEED = 0x6FFFFFFE
VER_FLG_WEAK = 0x2
LOAD_MODE_MMAP = 1  # enum llama_load_mode


class LlamaCppError(RuntimeError):
    """llama.cpp cannot run here, or refused the model: the message says which file and why."""


def glibc_version() -> tuple[int, int]:
    text = os.confstr("CS_GNU_LIBC_VERSION") or "glibc 0.0"  # e.g. "glibc 2.36"
    major, minor = text.split()[-1].split(".")[:2]
    return int(major), int(minor)


def package_dir() -> Path:
    """Where the wheel's libraries are, without importing the package (that loads nothing yet,
    but its import must come after the shim)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlamaCppError(
            f"llama.cpp rows need the `llama-cpp-py-sync` wheel ({PACKAGE} is not installed): "
            "pip install llama-cpp-py-sync"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def weaken_version_need(path: Path, version: str = NEEDED_GLIBC) -> int:
    """Mark `version` in the ELF file's version-needs (`.gnu.version_r`) weak, in place.

    Returns how many entries were changed. The dynamic loader then accepts the file on a glibc
    without that version, and resolves its symbols from whatever object defines them."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise LlamaCppError(f"{path}: not a little-endian 64-bit ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    changed = 0
    for _name, sh_type, _f, _a, offset, _size, link, count, _al, _es in sections:
        if sh_type != SHT_GNU_VERNEED:
            continue
        strtab = sections[link][4]
        need = offset
        for _ in range(count):
            _ver, n_aux, _file, aux, next_need = struct.unpack_from("<HHIII", data, need)
            entry = need + aux
            for _ in range(n_aux):
                _hash, flags, _other, name, next_aux = struct.unpack_from("<IHHII", data, entry)
                end = data.index(b"\0", strtab + name)
                if data[strtab + name : end].decode() == version and not flags & VER_FLG_WEAK:
                    struct.pack_into("<H", data, entry + 4, flags | VER_FLG_WEAK)
                    changed += 1
                entry += next_aux
            need += next_need
    if changed:
        path.write_bytes(bytes(data))
    return changed


def runtime_dir(cache: Path) -> Path | None:
    """A directory of the wheel's libraries this glibc can load, made once under `cache`; None
    when the installed ones load as they are (glibc >= 2.38)."""
    if glibc_version() >= (2, 38):
        return None
    source = package_dir()
    from importlib.metadata import version

    dest = cache / f"llamacpp-{version('llama-cpp-py-sync')}-runtime"
    if (dest / ".done").exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llamacpp-", dir=cache))
    try:
        for lib in source.glob("lib*.so*"):
            shutil.copy2(lib, tmp / lib.name)
            weaken_version_need(tmp / lib.name)
        (tmp / "shim.c").write_text(SHIM_SOURCE)
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            raise LlamaCppError(
                f"glibc {'.'.join(map(str, glibc_version()))} lacks the {NEEDED_GLIBC} symbols "
                "the llama.cpp wheel needs, and no C compiler (cc, gcc) is there to build the "
                "shim that provides them"
            )
        proc = subprocess.run(
            [compiler, "-std=gnu11", "-O2", "-shared", "-fPIC", "-o", str(tmp / "libshim.so")]
            + [str(tmp / "shim.c")],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise LlamaCppError(f"compiling the glibc shim {tmp / 'shim.c'}: {proc.stderr[-500:]}")
        (tmp / ".done").write_text("ok\n")
        logger.info("llama.cpp runtime for glibc %s made in %s", glibc_version(), dest)
        try:
            tmp.rename(dest)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


_LOADED: tuple | None = None


def load_library(cache: Path):
    """(ffi, lib) of llama.cpp, with the shim in place where this glibc needs it."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    where = runtime_dir(cache)
    if where is not None:
        ctypes.CDLL(str(where / "libshim.so"), mode=ctypes.RTLD_GLOBAL)
    try:
        from llama_cpp_py_sync import _cffi_bindings as bindings
    except ImportError as e:
        raise LlamaCppError(f"importing {PACKAGE}: {e}") from e
    if where is not None:  # the bindings look beside themselves first: point them at the copies
        bindings._find_library = lambda: str(where / "libllama.so")
    try:
        lib = bindings.get_lib()
    except RuntimeError as e:
        raise LlamaCppError(str(e)) from e
    _LOADED = (bindings.get_ffi(), lib)
    return _LOADED


class LlamaCppModel:
    """One GGUF model and one context on llama.cpp's CPU backend, fed token ids directly (the
    bench's prompts are ids, so no tokenizer is involved)."""

    def __init__(self, path: str | os.PathLike[str], *, cache: Path, n_ctx: int, threads: int):
        self.path = str(path)
        self.ffi, self.lib = load_library(cache)
        ffi, lib = self.ffi, self.lib
        self._log: list[str] = []

        @ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def on_log(level, text, _user):  # keep llama.cpp's chatter for error messages only
            self._log.append(ffi.string(text).decode(errors="replace"))
            del self._log[:-40]

        self._on_log = on_log  # the callback must outlive every call into the library
        lib.llama_log_set(on_log, ffi.NULL)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.load_mode = LOAD_MODE_MMAP
        params.use_extra_bufts = False  # no repacking into anonymous memory: stream the file
        self.model = lib.llama_model_load_from_file(self.path.encode(), params)
        if self.model == ffi.NULL:
            raise LlamaCppError(f"llama.cpp could not load {self.path}: {self.log_tail()}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if self.ctx == ffi.NULL:
            lib.llama_model_free(self.model)
            raise LlamaCppError(
                f"llama.cpp could not make a context for {self.path}: {self.log_tail()}"
            )
        self.n_past = 0

    def log_tail(self) -> str:
        return " | ".join(line.strip() for line in self._log[-6:] if line.strip()) or "no log"

    def decode(self, ids: list[int], *, all_logits: bool = False) -> list[array]:
        """Feed `ids` after what came before; float32 logits of the last position (of every
        position with `all_logits`)."""
        ffi, lib = self.ffi, self.lib
        n = len(ids)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, tok in enumerate(ids):
                batch.token[i] = tok
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == n - 1 else 0
            rc = lib.llama_decode(self.ctx, batch)
        finally:
            lib.llama_batch_free(batch)
        if rc != 0:
            raise LlamaCppError(f"llama_decode returned {rc} on {self.path}: {self.log_tail()}")
        self.n_past += n
        rows = range(n) if all_logits else [n - 1]
        out = []
        for i in rows:
            ptr = lib.llama_get_logits_ith(self.ctx, i)
            row = array("f")
            row.frombytes(ffi.buffer(ptr, 4 * self.n_vocab)[:])
            out.append(row)
        return out

    def close(self) -> None:
        if getattr(self, "ctx", None) is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None) is not None:
            self.lib.llama_model_free(self.model)
            self.model = None
