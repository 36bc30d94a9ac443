"""What runs: the engines and regimes, how the cold regime is made cold, and each child's spec.

A spec is the JSON a child process reads (`child.py`): which engine, which checkpoint files, how
RabbitLLM is configured, and whether its pages start cold or warm. Building it here keeps every
decision about a run in the parent, and the child a plain executor.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path

from . import memcap

# rabbit-auto: RabbitLLM with max_memory="auto" (cold regime only): as many layers resident as the
# cgroup's memory allows, the rest streamed; its floor counts only the bytes it streams.
# rabbit-8bit / rabbit-4bit: RabbitLLM streaming a compressed split of the checkpoint (written once,
# before any timing). llamacpp-*: llama.cpp's CPU library on the checkpoint written as GGUF.
COMPRESSED = {"rabbit-8bit": "8bit", "rabbit-4bit": "4bit"}
LLAMACPP = {"llamacpp-bf16": "bf16", "llamacpp-q8_0": "q8_0", "llamacpp-q4_0": "q4_0"}
#: Rows at equal bits, for the goals that compare RabbitLLM with llama.cpp.
EQUAL_BITS = {"rabbit-8bit": "llamacpp-q8_0", "rabbit-4bit": "llamacpp-q4_0"}
ENGINES = (
    "rabbit",
    "rabbit-split",
    "rabbit-auto",
    *COMPRESSED,
    "transformers",
    "accelerate",
    *LLAMACPP,
)
#: Rows whose weights are not the checkpoint's own: their tokens may differ from transformers'.
LOSSY = (*COMPRESSED, *LLAMACPP)
REGIMES = ("cold", "warm", "resident")
REGIME_ALIASES = {"1": "cold", "2": "warm", "3": "resident"}
REGIME_ENGINES = {  # accelerate with everything in memory is transformers itself; llama.cpp's
    # mapped file in the page cache is its warm row already
    "cold": ENGINES,
    "warm": tuple(e for e in ENGINES if e != "rabbit-auto"),
    "resident": ("rabbit", "rabbit-split", *COMPRESSED, "transformers"),
}
#: Below this a cgroup cap would starve python+torch itself: evict per step instead.
MIN_CAP = 512 << 20
GIB = 2**30
MB = 10**6


def parse_choices(text: str, allowed: tuple[str, ...], what: str, aliases=None) -> list[str]:
    """A comma-separated --regimes/--engines value, checked against what exists."""
    aliases = aliases or {}
    wanted = [aliases.get(x.strip(), x.strip()) for x in text.split(",") if x.strip()]
    for x in wanted:
        if x not in allowed:
            raise SystemExit(f"unknown {what} {x!r}; choose from {', '.join(allowed)}")
    return wanted


def run_order(regime: str, engines_wanted: list[str], rep: int) -> list[str]:
    """The engines of a regime, transformers first, rotated by `rep` so that no engine always
    runs first (or right after a cold start)."""
    order = [e for e in ("transformers", *ENGINES) if e in engines_wanted]
    order = [e for e in dict.fromkeys(order) if e in REGIME_ENGINES[regime]]
    if not order:
        return []
    k = rep % len(order)
    return order[k:] + order[:k]


def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    """The prompt every engine gets (ids >= 3: past the special tokens), made in the parent so
    that llama.cpp's child needs no torch to draw the same one."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def files_bytes(files: list[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def cold_regime(args: argparse.Namespace, total_bytes: int) -> dict:
    """How the cold regime is made cold here: a memory cgroup cap, or eviction after each step."""
    cap = int(args.cap_gb * GIB) if args.cap_gb else int(0.75 * total_bytes)
    if args.cap_method == "evict":
        method, detail = "evict", "asked for"
    else:
        method, detail = memcap.probe_cap_method()
    if method.startswith("cgroup") and cap < MIN_CAP:
        method = "evict"
        detail = f"a cap of {cap / MB:.0f} MB (below the model's size) would not hold python+torch"
    if args.cap_method == "cgroup" and not method.startswith("cgroup"):
        raise SystemExit(f"--cap-method cgroup: not possible here ({detail})")
    capped = method.startswith("cgroup")
    return {
        "name": "cold",
        "method": method,
        "cap": cap if capped else None,
        "method_detail": detail,
    }


def engine_spec(
    args: argparse.Namespace,
    *,
    engine: str,
    regime: dict,
    tag: str,
    ckpt: Path,
    files: list[str],
    split_dir: Path | None,
    split_files: list[str],
    total_bytes: int,
    tmp: Path,
    prompt_ids: list[int],
    artifact: tuple[Path, list[str]] | None = None,
) -> dict:
    """The child's spec for one engine in one regime (`tag` names its result files);
    `artifact` is a compressed or llama.cpp row's own (directory or file, files it reads)."""
    name = regime["name"]
    spec = {
        "engine": engine,
        "regime": name,
        "path": str(ckpt),
        "device": args.device,
        "tokens": args.tokens,
        "prompt": args.prompt,
        "prompt_ids": prompt_ids,
        "seed": args.seed,
        "prefetch": args.prefetch,
        "profile": not args.no_profile,
        "threads": args.threads,
        "result": str(tmp / f"{tag}.json"),
        "logits": str(tmp / f"{tag}.logits"),
        "files": files,
    }
    if engine == "rabbit-split":
        spec["layers_path"] = str(split_dir)
        spec["files"] = split_files
    if engine in COMPRESSED or engine in LLAMACPP:
        if artifact is None:
            raise ValueError(f"{engine}: no compressed split or GGUF file to run")
        where, spec["files"] = str(artifact[0]), artifact[1]
        if engine in COMPRESSED:
            spec["layers_path"] = where
        else:
            spec["path"] = where
            spec["llamacpp_cache"] = str(Path(args.workdir) / "llamacpp")
    if engine == "accelerate":
        offload = tmp / f"offload-{name}"
        shutil.rmtree(offload, ignore_errors=True)
        spec["offload_folder"] = str(offload)
    if engine == "rabbit-auto":
        spec["max_memory"] = "auto"
    if engine.startswith("rabbit") and name == "resident":
        spec["max_memory"] = int(total_bytes * 1.25) + (256 << 20)
    if name == "cold":
        spec["cold"] = True
        # A row whose files fit under the cap would keep them cached after its first step: it is
        # evicted before every step too, so that each step reads its bytes from storage.
        fits = regime["cap"] is not None and files_bytes(spec["files"]) <= regime["cap"]
        spec["evict_each_step"] = regime["method"] == "evict" or fits
    else:
        spec["warm"] = True
    return spec
