"""Perplexity of the default model with its decoder linears fake-quantized by rabbit_engine.quant.

Loads SmolLM2-135M-Instruct (the default model's local build) into transformers, in memory, and
scores a real English text available offline (default: the GPL-3 licence text Debian installs)
with every `nn.Linear` of the decoder layers replaced by `dequantize(quantize(w, scheme))`:
exactly the weights the int8/int4 kernels multiply by. Embeddings, norms and the (tied) head are
untouched. The text is cut into non-overlapping chunks of `--chunk` tokens, each scored on its
own (its first token unscored), and perplexity = exp(mean next-token NLL) over all chunks.

A scheme whose group size does not divide a layer's in_features cannot be packed (the kernel has
no partial groups) and is reported as n/a.

Caveat: the default model is built from a Q4_1 GGUF (4-bit, groups of 32, scale + min), so its
weights already lie on a 4-bit grid; 4-bit group-32 quantization can nearly reproduce them, and
its numbers flatter 4 bits compared with a model trained and released in bf16.

    python -m tools.rabbit_bench.quality
    python -m tools.rabbit_bench.quality --text /path/to/file.txt --max-tokens 8192 --chunk 2048
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import torch
from torch import nn

from rabbit_engine.errors import InvalidOptionError
from rabbit_engine.quant import CompressionScheme, dequantize, parse_compression, quantize

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
CONFIGS = ("8bit", "4bit-g32", "4bit-g64", "4bit-g128")


def perplexity(model: nn.Module, ids: torch.Tensor, chunk: int) -> tuple[float, int]:
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


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    layers = model.model.layers
    return {
        f"model.layers.{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


def scheme_of(label: str) -> CompressionScheme:
    if label == "8bit":
        return parse_compression("8bit")
    return parse_compression("4bit", group_size=int(label.split("-g")[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="English text file")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens scored (0: all)")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per scored chunk")
    parser.add_argument("--bf16", action="store_true", help="also score the model cast to bf16")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    dtype = next(model.parameters()).dtype
    print(f"model: {path} ({dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"text: {args.text} sha256 {hashlib.sha256(raw).hexdigest()} ({total} tokens)")
    print(
        f"scored: first {ids.numel()} tokens in non-overlapping chunks of {args.chunk} "
        f"(each chunk's first token unscored); scale dtype bfloat16"
    )
    linears = decoder_linears(model)
    originals = {name: m.weight.detach().clone() for name, m in linears.items()}
    stored = sum(w.numel() for w in originals.values())

    rows: list[tuple[str, float | None, int | None, str]] = []
    t0 = time.perf_counter()
    base, scored = perplexity(model, ids, args.chunk)
    rows.append((f"{str(dtype).removeprefix('torch.')} (checkpoint)", base, scored, ""))
    print(f"  baseline done in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.bf16:
        model.to(torch.bfloat16)
        ppl, _ = perplexity(model, ids, args.chunk)
        rows.append(("bfloat16 (cast)", ppl, None, ""))
        model.to(dtype)
        for name, m in linears.items():
            m.weight.data.copy_(originals[name])
    for label in CONFIGS:
        scheme = scheme_of(label)
        nbytes = 0
        try:
            for name, module in linears.items():
                packed = quantize(originals[name], scheme, name=name)
                nbytes += packed.nbytes
                module.weight.data.copy_(dequantize(packed, dtype=dtype))
        except InvalidOptionError as exc:
            rows.append((label, None, None, f"n/a: {exc}"))
            continue
        t0 = time.perf_counter()
        ppl, _ = perplexity(model, ids, args.chunk)
        bits = 8 * nbytes / stored
        rows.append((label, ppl, None, f"{bits:.2f} bits/weight stored"))
        print(f"  {label} done in {time.perf_counter() - t0:.1f}s", flush=True)
        for name, m in linears.items():
            m.weight.data.copy_(originals[name])

    print(f"{'weights':>22} {'perplexity':>11} {'vs base':>8}  note")
    for label, ppl, _, note in rows:
        if ppl is None:
            print(f"{label:>22} {'-':>11} {'-':>8}  {note}")
        else:
            print(f"{label:>22} {ppl:>11.4f} {100 * (ppl / base - 1):>+7.2f}%  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
