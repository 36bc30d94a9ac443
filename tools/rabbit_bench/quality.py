"""Perplexity of the default model streamed by RabbitLLM, uncompressed and compressed.

Loads SmolLM2-135M-Instruct (the default model's local build) with `AutoModel.from_pretrained`,
once per configuration: the checkpoint's own dtype, then `compression="8bit"` and
`compression="4bit"` with each group size: the product's own path (the compressed split written
into the cache, linears on torch's packed kernels), not a simulation of it. It scores a real
English text available offline (default: the GPL-3 licence text Debian installs), cut into
non-overlapping chunks of `--chunk` tokens, each scored on its own (its first token unscored):
perplexity = exp(mean next-token NLL) over all chunks. Embeddings, norms and the (tied) head stay
in the run dtype. "layer bytes" is what a token streams, relative to the uncompressed model.

A 4-bit group size that does not divide a linear's in_features leaves that linear uncompressed
(the kernel has no partial groups): the layer bytes column shows how much was compressed.

Caveat: the default model is built from a Q4_1 GGUF (4-bit, groups of 32, scale + min), so its
weights already lie on a 4-bit grid; 4-bit group-32 quantization can nearly reproduce them, and
its numbers flatter 4 bits compared with a model trained and released in bf16.

    python -m tools.rabbit_bench.quality
    python -m tools.rabbit_bench.quality --text /path/to/file.txt --max-tokens 8192 --chunk 2048
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from rabbit_engine.weights import RESIDENT

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
CONFIGS: dict[str, dict] = {
    "uncompressed": {},
    "8bit": {"compression": "8bit"},
    "4bit-g32": {"compression": "4bit", "group_size": 32},
    "4bit-g64": {"compression": "4bit", "group_size": 64},
    "4bit-g128": {"compression": "4bit", "group_size": 128},
}


def perplexity(model: torch.nn.Module, ids: torch.Tensor, chunk: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping chunks of `ids`, and the number of tokens scored."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - 1, chunk):
            piece = ids[start : start + chunk][None]
            if piece.shape[1] < 2:
                break
            loss = model(input_ids=piece, labels=piece).loss.item()
            scored = piece.shape[1] - 1
            nll += loss * scored
            count += scored
    return math.exp(nll / count), count


def layer_bytes(model: torch.nn.Module) -> int:
    """Bytes one token streams: every decoder layer's, as read from storage."""
    weight_map = model._rabbit_streamer.weight_map
    return sum(weight_map.nbytes(gid) for gid in weight_map.groups if gid != RESIDENT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="English text file")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens scored (0: all)")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per scored chunk")
    parser.add_argument("--dtype", default="bfloat16", help="run dtype (default bfloat16)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoTokenizer

    from rabbitllm import AutoModel
    from rabbitllm.default_model import default_model_path

    path = default_model_path()
    raw = args.text.read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer(raw.decode("utf-8"))["input_ids"])
    total = ids.numel()
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if ids.numel() < 2000:
        raise SystemExit(f"{args.text} gives {ids.numel()} tokens; need >= 2000")
    print(f"model: {path} (run dtype {args.dtype}, torch {torch.__version__})")
    print(f"text: {args.text} sha256 {hashlib.sha256(raw).hexdigest()} ({total} tokens)")
    print(
        f"scored: first {ids.numel()} tokens in non-overlapping chunks of {args.chunk} "
        "(each chunk's first token unscored)"
    )
    rows: list[tuple[str, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="rabbit-quality-") as cache:
        os.environ["RABBITLLM_CACHE"] = cache  # compressed splits of this run only
        for label in args.configs.split(","):
            t0 = time.perf_counter()
            with AutoModel.from_pretrained(path, dtype=args.dtype, **CONFIGS[label]) as model:
                ppl, _ = perplexity(model, ids, args.chunk)
                rows.append((label, ppl, layer_bytes(model)))
            print(f"  {label} done in {time.perf_counter() - t0:.1f}s", flush=True)
    base, base_bytes = rows[0][1], rows[0][2]
    print(f"{'weights':>14} {'perplexity':>11} {'vs ' + rows[0][0]:>16} {'layer bytes':>12}")
    for label, ppl, nbytes in rows:
        print(
            f"{label:>14} {ppl:>11.4f} {100 * (ppl / base - 1):>+15.2f}% "
            f"{100 * nbytes / base_bytes:>11.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
