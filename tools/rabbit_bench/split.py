"""Benchmark rabbit-store's split against a plain `cp` of the same checkpoint.

Writes a Llama-shaped bf16 safetensors checkpoint (default: TinyLlama-1.1B sizes, ~2.2 GB, in
shards with an index), then runs `cp -r` and `split_checkpoint` alternately, `--repeat` times each,
on the same disk, and prints the best time of each and the ratio split/copy (goal: <= 1.25).

Both read the source from the page cache (it was just written) and write a new directory; each
run is timed to the end of the command ("cached": data handed to the kernel) and again after an
`os.sync()` ("synced": data on disk), with dirty pages flushed before each run, so neither pays the
other's writeback.

    python -m tools.rabbit_bench.split               # ~2.2 GB in a temp dir
    python -m tools.rabbit_bench.split --layers 4 --repeat 2 --workdir /mnt/nvme/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from rabbit_store import split_checkpoint
from rabbit_store.safetensors_header import TensorInfo, build_header

NOISE_BYTES = 64 * 1024 * 1024


def llama_tensors(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama checkpoint with the given sizes, in the order HF saves them."""
    h, i, v = args.hidden, args.intermediate, args.vocab
    head_dim = h // args.heads
    kv = args.kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(args.layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def write_checkpoint(path: Path, args: argparse.Namespace) -> int:
    """Shards of at most --shard-mb with random-looking bf16 bytes (one random block, reused)."""
    path.mkdir(parents=True, exist_ok=True)
    noise = memoryview(os.urandom(NOISE_BYTES))
    shards: list[list[TensorInfo]] = [[]]
    shard_bytes = 0
    for name, shape in llama_tensors(args):
        nbytes = 2 * math.prod(shape)
        if shards[-1] and shard_bytes + nbytes > args.shard_mb * 1024 * 1024:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(TensorInfo(name, "", "BF16", shape, 0, nbytes))
        shard_bytes += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for k, infos in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(path / file, "wb") as handle:
            handle.write(build_header(infos, {"format": "pt"}))
            for info in infos:
                left = info.nbytes
                while left:
                    step = min(left, NOISE_BYTES)
                    handle.write(noise[:step])
                    left -= step
                weight_map[info.name] = file
                total += info.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": args.layers})
    )
    return total


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its finished children."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(action) -> tuple[float, float, float]:
    """(seconds until `action` returns, seconds until its data is synced, CPU seconds it used),
    dirty pages flushed first."""
    os.sync()
    cpu = cpu_seconds()
    start = time.perf_counter()
    action()
    done = time.perf_counter()
    cpu = cpu_seconds() - cpu
    os.sync()
    return done - start, time.perf_counter() - start, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.rabbit_bench.split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=1000, help="shard size cap in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument("--workdir", help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rabbit-bench-", dir=args.workdir))
    try:
        src, copy_dir, split_dir = work / "src", work / "copy", work / "split"
        total = write_checkpoint(src, args)
        print(
            f"checkpoint: {total / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards, "
            f"{args.layers} layers"
        )

        def copy() -> None:
            subprocess.run(["cp", "-r", str(src), str(copy_dir)], check=True)

        def split() -> None:
            split_checkpoint(str(src), str(split_dir), progress=False)

        results: dict[str, list[tuple[float, float, float]]] = {"cp": [], "split": []}
        for run in range(args.repeat):
            for name, action, out in (("cp", copy, copy_dir), ("split", split, split_dir)):
                shutil.rmtree(out, ignore_errors=True)
                results[name].append(timed(action))
                cached, synced, cpu = results[name][-1]
                print(
                    f"run {run + 1} {name:5s}: {cached:6.2f} s cached, {synced:6.2f} s synced, "
                    f"{cpu:6.2f} s CPU"
                )
        best = {name: [min(r[k] for r in runs) for k in range(3)] for name, runs in results.items()}
        for mode, k in (("cached", 0), ("synced", 1), ("CPU", 2)):
            ratio = best["split"][k] / best["cp"][k]
            print(
                f"best {mode:6s}: cp {best['cp'][k]:6.2f} s, split {best['split'][k]:6.2f} s "
                f"-> ratio split/copy = {ratio:.2f}"
            )
        print(
            f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
            "(others' work inflates both)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
