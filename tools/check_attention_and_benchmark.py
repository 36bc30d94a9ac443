#!/usr/bin/env python
"""Which attention kernel runs here, why, and (with --benchmark) what each one costs.

  python tools/check_attention_and_benchmark.py              # availability + active kernel
  python tools/check_attention_and_benchmark.py --benchmark  # + tokens/s: auto vs sdpa vs eager
  python tools/check_attention_and_benchmark.py --model org/name --device cuda --dtype bfloat16

Prints `is_flash_attention_available()` and its reason, then the implementation the engine picked
for the model (`model.active_attention_implementation`) with `attn_implementation="auto"`. The
benchmark loads the model once per implementation and times greedy decoding of the same prompt
(prefill excluded: the first token's time is subtracted), so the figures compare kernels, not
loads. Without --model it uses the default model (SmolLM2-135M-Instruct, built into the cache on
first use). The options are built as `StreamingOptions`, so a bad --device or --dtype fails with
the engine's own message before any weight is read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

IMPLEMENTATIONS = ("auto", "sdpa", "eager")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="local dir, hub id or fsspec URL (default: the default model)")
    ap.add_argument(
        "--benchmark", action="store_true", help="time decoding with auto, sdpa and eager"
    )
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    ap.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16 (default: checkpoint's)"
    )
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per implementation")
    ap.add_argument("--prompt", default="The three primary colours are", help="prompt text")
    ap.add_argument("--max-memory", default=None, help="resident-layer budget, e.g. 6GiB or auto")
    return ap.parse_args(argv)


def load(source: str, impl: str, args: argparse.Namespace):
    from rabbit_engine.options import StreamingOptions
    from rabbitllm import AutoModel

    options = StreamingOptions.create(
        device=args.device,
        dtype=args.dtype,
        attn_implementation=impl,
        max_memory=args.max_memory,
    )
    return AutoModel.from_pretrained(source, options=options)


def decode_rate(model, input_ids, tokens: int) -> float:
    """Decode tokens/s: time for 1 + `tokens` new tokens minus time for 1 (the prefill)."""
    import torch

    def timed(n: int) -> float:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - start

    timed(1)  # warm-up: first-call kernel selection and page faults are not the kernel's cost
    prefill = timed(1)
    total = timed(tokens + 1)
    return tokens / max(total - prefill, 1e-9)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rabbitllm.utils.platform import is_flash_attention_available

    available, reason = is_flash_attention_available()
    print(f"flash_attention_2 available: {available}" + ("" if available else f" ({reason})"))

    source = args.model
    if source is None:
        from rabbitllm.default_model import default_model_path

        source = str(default_model_path())
    from transformers import AutoTokenizer

    from rabbit_store import open_source

    local = open_source(source).local_path("config.json")
    if local is None:
        print("(a remote model: the benchmark uses token ids 1..N as its prompt)", file=sys.stderr)

    model = load(source, "auto", args)
    print(f"model: {source}")
    print(
        "active implementation with attn_implementation='auto': "
        f"{model.active_attention_implementation}"
    )
    print(f"device: {model.device}, dtype: {model.dtype}")
    if not args.benchmark:
        model.close()
        return 0

    import torch

    if local is not None:
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(local))
        input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    else:
        input_ids = torch.arange(1, 17).unsqueeze(0)
    rows = []
    for impl in IMPLEMENTATIONS:
        if impl != "auto":
            model = load(source, impl, args)
        try:
            rate = decode_rate(model, input_ids.to(model.device), args.tokens)
            rows.append((impl, model.active_attention_implementation, rate))
        finally:
            model.close()
    base = rows[0][2]
    print(f"\n{'requested':<10} {'active':<18} {'tokens/s':>9} {'vs auto':>8}")
    for impl, active, rate in rows:
        print(f"{impl:<10} {active:<18} {rate:>9.2f} {rate / base:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
