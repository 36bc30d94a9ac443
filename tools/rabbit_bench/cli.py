"""The bench's flags and the order of a run: checkpoint, split, regimes, engines, results."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import concurrency, goals, table
from .checkpoint import QUICK, Shape, checkpoint_files, layer_facts, shape_for_size
from .machine import machine_info
from .runner import (
    Runner,
    child_bandwidth,
    log,
    make_split,
    merge_repeats,
    prepare_artifacts,
    prepare_checkpoint,
)
from .spec import (
    ENGINES,
    GIB,
    LLAMACPP,
    MB,
    REGIME_ALIASES,
    REGIMES,
    cold_regime,
    parse_choices,
    prompt_ids,
    run_order,
)

DESCRIPTION = (sys.modules[__package__].__doc__ or "").split("\n\n")[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tools.rabbit_bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick", action="store_true", help="a few-MB model, 4 decode steps: a smoke test"
    )
    ap.add_argument(
        "--model",
        default=None,
        help="measure this local checkpoint directory (config.json + safetensors) instead of a "
        "generated one (the widths options are then ignored)",
    )
    ap.add_argument(
        "--size-gb", type=float, default=2.0, help="model size in GB (1e9 bytes); sets --layers"
    )
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help="overrides --size-gb")
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--regimes", default=",".join(REGIMES), help="cold,warm,resident (or 1,2,3)")
    ap.add_argument(
        "--engines",
        default=None,
        help=f"{','.join(ENGINES)} (default: all; the llamacpp-* rows only where the "
        "llama-cpp-py-sync wheel is installed)",
    )
    ap.add_argument(
        "--tokens", type=int, default=None, help="decode steps timed (default 8; 4 with --quick)"
    )
    ap.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every engine this many times per regime (order rotated); median over all steps",
    )
    ap.add_argument("--prefetch", type=int, default=2, help="RabbitLLM prefetch depth")
    ap.add_argument("--no-profile", action="store_true", help="run RabbitLLM without its profiler")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch (and llama.cpp) threads in every child (default: torch's; llama.cpp's: "
        "every CPU this process may use)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of every child (negative needs root): on a machine others are using, "
        "e.g. -10 keeps their load from dominating the timings",
    )
    ap.add_argument(
        "--device", default="cpu", help="cpu or cuda (the cold regime caps host memory only)"
    )
    ap.add_argument(
        "--cap-gb",
        type=float,
        default=None,
        help="cold regime memory cap in GiB (default 0.75 x model size)",
    )
    ap.add_argument("--cap-method", choices=("auto", "cgroup", "evict"), default="auto")
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="also drop the whole page cache (/proc/sys/vm/drop_caches) before each cold run; "
        "off by default: the files' own pages are evicted either way, and other users of the "
        "machine lose their cache",
    )
    ap.add_argument(
        "--workdir",
        default=os.environ.get(
            "RABBIT_BENCH_DIR", str(Path(tempfile.gettempdir()) / "rabbitllm-bench")
        ),
    )
    ap.add_argument(
        "--fresh", action="store_true", help="rewrite the checkpoint and split directory"
    )
    ap.add_argument("--keep", action="store_true", help="keep per-run logs and offload folders")
    ap.add_argument("--child-timeout", type=float, default=1800)
    ap.add_argument("--json", default=None, help="write every measurement to this file")
    ap.add_argument(
        "--concurrency",
        default=None,
        metavar="C,C,...",
        help="also run C equal greedy requests per streamed pass through the batch scheduler, "
        "cold and warm, for each level (e.g. 1,2,4,8,16): tokens/s, passes per token "
        "(concurrency.py)",
    )
    # What the parent starts its children with (runner.spawn):
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-bw", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-concurrency", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-gguf", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def resolve_model(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.is_dir():
        try:  # a hub id already in the local cache (or downloadable): its snapshot directory
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # noqa: BLE001 - any failure means: not a usable model
            raise SystemExit(
                f"--model {model}: not a local directory, and not found on the hub ({e})"
            ) from None
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {path}: needs config.json and safetensors weights")
    try:
        checkpoint_files(path)
    except Exception as e:  # noqa: BLE001 - rabbit_store's typed error says what is wrong
        raise SystemExit(f"--model {path}: {e}") from None
    return path.resolve()


def run_child(args: argparse.Namespace) -> int | None:
    """The hidden child modes; None when this is the parent."""
    if args.child:
        from .child import main as child_main

        return child_main(args.child)
    if args.child_bw:
        return child_bandwidth(args.child_bw)
    if args.child_concurrency:
        return concurrency.child_main(args.child_concurrency)
    if args.make_checkpoint:
        from .checkpoint import make_checkpoint

        spec = json.loads(Path(args.make_checkpoint).read_text())
        where = Path(args.make_checkpoint).parent
        make_checkpoint(Shape(**spec["shape"]), where, fresh=spec["fresh"], log=log)
        return 0
    if args.make_gguf:
        from .gguf_export import export_and_check

        spec = json.loads(Path(args.make_gguf).read_text())
        export_and_check(
            Path(spec["checkpoint"]),
            Path(spec["dest"]),
            spec["kind"],
            cache=Path(spec["cache"]),
            threads=spec["threads"],
        )
        return 0
    return None


def default_engines() -> str:
    """Every engine; the llama.cpp rows only where its wheel is installed (said in the log)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp_py_sync") is not None:
        return ",".join(ENGINES)
    log("llama.cpp rows left out: the llama-cpp-py-sync wheel is not installed")
    return ",".join(e for e in ENGINES if e not in LLAMACPP)


def choose_shape(args: argparse.Namespace) -> Shape:
    widths = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "seed": args.seed,
    }
    if args.quick:
        return QUICK
    if args.layers:
        return Shape(layers=args.layers, **widths)
    return shape_for_size(args.size_gb, **widths)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    child_rc = run_child(args)
    if child_rc is not None:
        return child_rc

    if args.tokens is None:
        args.tokens = 4 if args.quick else 8
    shape = choose_shape(args)
    regimes_wanted = parse_choices(args.regimes, REGIMES, "regime", REGIME_ALIASES)
    args.engines = args.engines or default_engines()
    engines_wanted = parse_choices(args.engines, ENGINES, "engine")
    levels = concurrency.parse_levels(args.concurrency) if args.concurrency else None

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(workdir)
    ckpt = (
        resolve_model(args.model) if args.model else prepare_checkpoint(shape, workdir, args.fresh)
    )
    facts = layer_facts(ckpt)
    log(
        f"checkpoint {ckpt}: {facts['total_bytes'] / 1e9:.3f} GB, {facts['num_layers']} layers "
        f"of {facts['largest_layer'] / MB:.1f} MB, resident parts "
        f"{facts['resident_bytes'] / MB:.1f} MB"
    )
    split_dir, split_err = None, ""
    if "rabbit-split" in engines_wanted:
        split_dir, split_err = make_split(ckpt, workdir, args.fresh)
        if split_dir is None:
            log(f"split failed: {split_err}")

    artifacts, artifact_errors = prepare_artifacts(engines_wanted, ckpt, workdir, args)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    prompt = prompt_ids(vocab, args.prompt, args.seed)

    regimes: dict[str, dict] = {name: {"name": name} for name in regimes_wanted}
    if "cold" in regimes:
        cold = regimes["cold"] = cold_regime(args, facts["total_bytes"])
        if cold["cap"]:
            log(
                f"cold regime: {cold['method']} memory cap {cold['cap'] / GIB:.2f} GiB (model "
                f"{facts['total_bytes'] / GIB:.2f} GiB), page cache included; parent cgroup "
                f"{cold['method_detail']}"
            )
        else:
            log(
                "cold regime: evicting the checkpoint's pages after every step "
                f"(no cap: {cold['method_detail']})"
            )

    runner = Runner(args, ckpt, split_dir, facts, prompt, artifacts, artifact_errors)
    results: list[dict] = []
    started = time.time()
    for name in regimes_wanted:
        reg = regimes[name]
        log(f"regime {name}:")
        if name == "cold":
            before = runner.bandwidth(reg)
            log(
                f"  cold read bandwidth before the engines: read() "
                f"{', '.join(f'{x / GIB:.2f}' for x in before['read_bps'])} GiB/s, mmap faults "
                f"{', '.join(f'{x / GIB:.2f}' for x in before['mmap_fault_bps'])} GiB/s"
            )
        runs: dict[str, list[dict]] = {eng: [] for eng in run_order(name, engines_wanted, 0)}
        for rep in range(args.repeat):
            for eng in run_order(name, engines_wanted, rep):
                runs[eng].append(runner.run(eng, reg, rep))
        results.extend(merge_repeats(rs) for rs in runs.values())
        if name == "cold":
            # Bracket the engines: the disk's speed drifts (a shared virtual disk does), and the
            # floor must be what the disk could do while they ran.
            goals.set_cold_floor(reg, facts, before, runner.bandwidth(reg))
            log(f"  floor: {reg['floor_desc']}")
        else:
            goals.set_transformers_floor(reg, results)
    streams = concurrency.measure(runner, regimes, levels) if levels else []
    goals.add_compute_overlap(regimes, results)
    if goals.set_ratios(results, regimes, facts) is None:
        log("transformers did not run: tokens cannot be compared")

    table.print_header(
        args,
        ckpt=ckpt,
        facts=facts,
        machine=machine,
        results=results,
        regimes=regimes,
        split_err=split_err,
    )
    table.print_table(results, regimes, facts)
    table.print_artifacts(artifacts, artifact_errors)
    met = goals.evaluate(results, regimes, facts)
    goals.print_goals(met)
    table.print_profiles(results)
    if levels:
        concurrency.print_results(streams, args)
    print(f"\n(total {time.time() - started:.0f} s)")
    if args.json:
        payload = {
            "shape": None if args.model else asdict(shape),
            "model": str(ckpt),
            "facts": facts,
            "machine": machine,
            "args": vars(args),
            "regimes": regimes,
            "results": results,
            "goals": met,
            "artifacts": {k: {**v, "path": str(v["path"])} for k, v in artifacts.items()},
            "artifact_errors": artifact_errors,
            "concurrency": streams,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(runner.tmp, ignore_errors=True)
    return 0 if all(r.get("ok") for r in [*results, *streams]) else 1
