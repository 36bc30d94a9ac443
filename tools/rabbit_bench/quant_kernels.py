"""Time torch's CPU weight-only kernels against a bf16 linear, on decoder-sized weights.

For each weight shape ([out, in]: 2048x5632 is a Llama-1B down_proj, 5632x2048 its up/gate_proj)
and batch (1: decode, 8: a short prefill chunk), times one call of

- `bf16`: F.linear on the bf16 weight (what streaming runs today),
- `int8pack`: `quantized_linear` on an 8-bit packed weight (`aten._weight_int8pack_mm`),
- `int4pack g32/g64/g128`: `quantized_linear` on 4-bit packed weights
  (`aten._weight_int4pack_mm_for_cpu`),
- `dequant+linear 8bit / 4bit g64`: `dequantize` to bf16 then F.linear (the fallback path, what a
  token would pay if the engine dequantized on the compute thread),

and, with `--compile`, the alternatives the issue asked to try:

- `compiled woq 8bit`: `torch.compile` of `F.linear(x, q.to(bf16)) * scale` (inductor's CPU
  weight-only int8 pattern; about a minute of compiling per shape and batch),
- `torchao int8wo`: torchao's `Int8WeightOnlyConfig` on an nn.Linear, when torchao imports (it is
  not a dependency; its CPU int4 path calls the same `_weight_int4pack_mm_for_cpu` we call),

and prints the median ms and the ratio to bf16 side by side. One thread by default (the budgeted
machine has few cores; the kernels' ranking is what matters).

    python -m tools.rabbit_bench.quant_kernels
    python -m tools.rabbit_bench.quant_kernels --threads 2 --min-time 1.0
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rabbit_engine.quant import dequantize, parse_compression, quantize, quantized_linear

SHAPES = ((2048, 5632), (5632, 2048))
BATCHES = (1, 8)


def median_ms(fn: Callable[[], object], min_time: float, min_reps: int = 5) -> float:
    """Median of repeated timings after one warm-up call, for at least `min_time` seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument(
        "--compile", action="store_true", help="also torch.compile's and torchao's int8 paths"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} thread(s), median of >= {args.min_time}s per cell"
    )
    header = f"{'weight [out,in]':>16} {'batch':>5} {'method':>22} {'median ms':>10} {'/bf16':>7}"
    print(header)
    print("-" * len(header))
    schemes = {
        "int8pack": parse_compression("8bit"),
        "int4pack g32": parse_compression("4bit", group_size=32),
        "int4pack g64": parse_compression("4bit", group_size=64),
        "int4pack g128": parse_compression("4bit", group_size=128),
    }
    for out_f, in_f in SHAPES:
        weight = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)
        packed = {label: quantize(weight, scheme) for label, scheme in schemes.items()}
        for batch in BATCHES:
            x = torch.randn(batch, in_f, dtype=torch.bfloat16)
            cells: list[tuple[str, Callable[[], object]]] = [
                ("bf16 F.linear", lambda x=x, weight=weight: F.linear(x, weight))
            ]
            for label, p in packed.items():
                cells.append((label, lambda x=x, p=p: quantized_linear(x, p)))
            for label, key in (
                ("dequant+linear 8bit", "int8pack"),
                ("dequant+linear 4bit g64", "int4pack g64"),
            ):
                p = packed[key]
                cells.append(
                    (label, lambda x=x, p=p: F.linear(x, dequantize(p, dtype=torch.bfloat16)))
                )
            if args.compile:
                cells += _alternatives(x, weight, packed["int8pack"])
            base = None
            for label, fn in cells:
                ms = median_ms(fn, args.min_time)
                base = ms if base is None else base
                print(
                    f"{f'{out_f}x{in_f}':>16} {batch:>5} {label:>22} {ms:>10.3f} {ms / base:>7.2f}"
                )
    return 0


def _alternatives(
    x: torch.Tensor, weight: torch.Tensor, packed
) -> list[tuple[str, Callable[[], object]]]:
    """torch.compile's weight-only int8 pattern and torchao's int8 weight-only linear."""
    q, scale = packed.qweight, packed.scales
    compiled = torch.compile(lambda x: F.linear(x, q.to(x.dtype)) * scale)
    cells: list[tuple[str, Callable[[], object]]] = [("compiled woq 8bit", lambda: compiled(x))]
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("  (torchao not importable: its row is left out)")
        return cells
    linear = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    linear[0].weight.data.copy_(weight.float())
    linear = linear.to(torch.bfloat16)
    quantize_(linear, Int8WeightOnlyConfig())
    cells.append(("torchao int8wo", lambda: linear(x)))
    return cells


if __name__ == "__main__":
    raise SystemExit(main())
