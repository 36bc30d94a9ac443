"""Micro-benchmark of ways to stream decoder-layer weights from storage, engine-free.

For each mode, a child process (in a memory cgroup capped like the bench's cold regime, when one
can be made) walks the decoder layers of a safetensors checkpoint and runs one GEMV per weight
matrix (decode-like compute), timing each token. It isolates the read path from the engine. The
modes are the ones docs/performance.md reports ("Diagnosis of the cold regime"):

  fault-file     mmap (private), compute faults the pages in, tensors taken in file order
  fault-forward  the same, tensors in forward order (q, k, v, o, gate, up, down), as a model runs
                 them
  willneed       helper thread: madvise(MADV_WILLNEED) on the next `depth` layers; compute faults
  willneed-inline-forward  one WILLNEED over each of the next `depth` layers' byte span, issued
                 inline by the compute thread; compute faults in forward order (pipeline f5727a2)
  pread-cache-forward  helper thread preads the next `depth` layers' byte spans into the page
                 cache (data discarded), compute does not wait for it and faults in forward order
                 (pipeline 1815a09)
  pread-cache-wait-forward  the same, but compute waits for the layer's read before running it
  populate       helper thread: madvise(MADV_POPULATE_READ) on the next `depth` layers, file order;
                 compute waits for it (no faults in compute)
  populate-forward   the same in forward order
  populate-ctypes  as populate, through libc's madvise via ctypes (releases the GIL; CPython's
                 mmap.madvise holds it for the whole call): what the engine does today
  pread          helper thread: pread into a ring of depth+1 buffers, then fadvise(DONTNEED)
  direct         helper thread: O_DIRECT pread into a ring of aligned buffers

Tensors and layers come from rabbit_store (`CheckpointIndex`, `LayerPlan`), as the engine sees them.

  python -m tools.rabbit_bench.readpaths CKPT_DIR [--cap-gb 1.41] [--tokens 6] [--modes a,b]
      [--warm] [--workers 2] [--threads 1] [--ballast-mb 350]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rabbit_engine.readahead import MADV_POPULATE_READ
from rabbit_store import TensorInfo

from . import memcap
from .checkpoint import checkpoint_files, checkpoint_plan
from .runner import REPO_ROOT

FORWARD = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class Mode:
    """One way of reading: the order compute touches a layer's tensors, what reads the next
    layers ahead (None: nothing, compute faults), and whether compute waits for that read."""

    order: str  # "file" | "forward"
    ahead: str | None = None  # see READERS
    wait: bool = True


MODES = {
    "fault-file": Mode("file"),
    "fault-forward": Mode("forward"),
    "willneed": Mode("file", "willneed"),
    "willneed-inline-forward": Mode("forward", "willneed-inline", wait=False),
    "pread-cache-forward": Mode("forward", "pread-cache", wait=False),
    "pread-cache-wait-forward": Mode("forward", "pread-cache"),
    "populate": Mode("file", "populate"),
    "populate-forward": Mode("forward", "populate"),
    "populate-ctypes": Mode("file", "populate-ctypes"),
    "pread": Mode("file", "pread"),
    "direct": Mode("file", "direct"),
}
#: Read-aheads that hand compute its own buffers (the others leave it to the mapping).
BUFFERED = ("pread", "direct")


def decoder_matrices(ckpt: Path) -> list[list[TensorInfo]]:
    """Each decoder layer's 2-D tensors in checkpoint order (shard, then offset)."""
    plan = checkpoint_plan(ckpt)
    tensors = plan.index.tensors
    return [[tensors[n] for n in layer if len(tensors[n].shape) == 2] for layer in plan.layers]


def forward_rank(info: TensorInfo) -> int:
    kind = info.name.split(".")[-2]
    return FORWARD.index(kind) if kind in FORWARD else len(FORWARD)


def child(args: argparse.Namespace) -> dict:
    import torch

    name, tokens, depth = args.child, args.tokens, args.depth
    mode = MODES[name]
    torch.set_num_threads(args.threads)
    ballast = bytearray(
        args.ballast_mb << 20
    )  # anonymous memory held, like an engine's resident parts
    root = Path(args.ckpt)
    layers = decoder_matrices(root)
    if mode.order == "forward":
        layers = [sorted(layer, key=forward_rank) for layer in layers]
    num = len(layers)
    files = sorted({info.file for layer in layers for info in layer})
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    maps = {}
    for f in files:
        with open(root / f, "rb") as fh:
            maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    bases = {f: ctypes.addressof(ctypes.c_char.from_buffer(m)) for f, m in maps.items()}
    fds = {
        f: os.open(root / f, os.O_RDONLY | (os.O_DIRECT if mode.ahead == "direct" else 0))
        for f in files
    }

    def view(buf: memoryview, info: TensorInfo) -> torch.Tensor:
        return torch.frombuffer(buf, dtype=dtypes[info.dtype]).view(info.shape)

    def mapped(i: int) -> list[torch.Tensor]:
        return [view(memoryview(maps[t.file])[t.offset : t.end], t) for t in layers[i]]

    def layer_spans(i: int) -> dict[str, list[int]]:
        """Per file, the page-aligned byte span covering the layer's tensors."""
        spans: dict[str, list[int]] = {}
        for t in layers[i]:
            sp = spans.setdefault(t.file, [t.offset, t.end])
            sp[0], sp[1] = min(sp[0], t.offset), max(sp[1], t.end)
        for sp in spans.values():
            sp[0] -= sp[0] % PAGE
        return spans

    def advise(i: int, how: int) -> None:
        for t in layers[i]:
            start = t.offset - t.offset % PAGE
            if mode.ahead == "populate-ctypes":
                if memcap.libc().madvise(bases[t.file] + start, t.end - start, how) != 0:
                    raise OSError(ctypes.get_errno(), "madvise")
            else:
                maps[t.file].madvise(how, start, t.end - start)

    scratch = memoryview(bytearray(8 << 20))

    def pread_span(i: int) -> None:
        for f, (s, e) in layer_spans(i).items():
            while s < e:
                s += os.preadv(fds[f], [scratch[: min(len(scratch), e - s)]], s) or (e - s)

    biggest = max(sum(t.nbytes + 2 * PAGE for t in layer) for layer in layers)
    rings = depth + 1 if mode.ahead in BUFFERED else 0
    ring = [mmap.mmap(-1, biggest + (8 << 20)) for _ in range(rings)]

    def read_into(i: int) -> list[torch.Tensor]:
        mv = memoryview(ring[i % len(ring)]) if mode.ahead in BUFFERED else None
        off, out = 0, []
        for t in layers[i]:
            if mode.ahead == "direct":
                a, b = t.offset - t.offset % PAGE, -(-t.end // PAGE) * PAGE
                os.preadv(fds[t.file], [mv[off : off + b - a]], a)
                out.append(view(mv[off + t.offset - a : off + t.end - a], t))
                off += b - a
            else:
                os.preadv(fds[t.file], [mv[off : off + t.nbytes]], t.offset)
                os.posix_fadvise(fds[t.file], t.offset, t.nbytes, os.POSIX_FADV_DONTNEED)
                out.append(view(mv[off : off + t.nbytes], t))
                off = -(-(off + t.nbytes) // PAGE) * PAGE
        return out

    def read_ahead(i: int) -> list[torch.Tensor] | None:
        if mode.ahead == "willneed":
            advise(i, mmap.MADV_WILLNEED)
        elif mode.ahead in ("populate", "populate-ctypes"):
            advise(i, MADV_POPULATE_READ)
        elif mode.ahead == "pread-cache":
            pread_span(i)
        elif mode.ahead in BUFFERED:
            return read_into(i)
        return None

    pool = ThreadPoolExecutor(args.workers)
    memcap.pageout_own_mappings([str(root / f) for f in files])
    memcap.evict_files([str(root / f) for f in files])
    steps, cpu = [], []
    for _ in range(tokens):
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        pending: dict[int, Future | None] = {}
        for i in range(num):
            ahead = range(i + 1, min(num, i + depth + 1))
            got = None
            if mode.ahead == "willneed-inline":
                for j in ahead:
                    if j not in pending:
                        for f, (s, e) in layer_spans(j).items():
                            maps[f].madvise(mmap.MADV_WILLNEED, s, e - s)
                        pending[j] = None
            elif mode.ahead and not mode.wait:  # the helper reads ahead; compute never waits
                for j in ahead:
                    if j not in pending:
                        pending[j] = pool.submit(read_ahead, j)
            elif mode.ahead:
                for j in (i, *ahead):
                    if j not in pending:
                        pending[j] = pool.submit(read_ahead, j)
                got = pending.pop(i).result()
            for w in got if mode.ahead in BUFFERED else mapped(i):
                w @ torch.zeros(w.shape[1], dtype=w.dtype)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        steps.append(time.perf_counter() - t0)
        cpu.append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
    del ballast
    return {"mode": name, "steps": steps, "cpu": cpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.rabbit_bench.readpaths", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("ckpt")
    ap.add_argument("--modes", default=",".join(MODES), help=",".join(MODES))
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--depth", type=int, default=2, help="layers read ahead by the helper thread")
    ap.add_argument(
        "--cap-gb", type=float, default=None, help="memory cap (default 0.75 x the files)"
    )
    ap.add_argument("--warm", action="store_true", help="no cap, files in the page cache")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="helper threads reading ahead")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the GEMVs")
    ap.add_argument(
        "--ballast-mb", type=int, default=0, help="anonymous memory the child holds (MB)"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.child:
        res = child(args)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    files = [str(p) for p in checkpoint_files(Path(args.ckpt))]
    total = sum(os.path.getsize(f) for f in files)
    cap = int((args.cap_gb * 2**30) if args.cap_gb else 0.75 * total)
    method = "warm (no cap)" if args.warm else memcap.probe_cap_method()[0]
    print(
        f"{args.ckpt}: {total / 1e9:.2f} GB; {method}"
        + ("" if args.warm else f", cap {cap / 2**30:.2f} GiB")
    )
    if not args.warm and method.startswith("cgroup"):
        bw = statistics.median(memcap.read_bandwidth(files)[0] for _ in range(2))
        print(f"cold read() bandwidth (no cap, this process): {bw / 2**30:.2f} GiB/s")
    print(
        f"{'mode':<24} {'s/token (median, token 1 dropped)':>34} {'user s':>7} {'sys s':>7} "
        f"{'limit hits':>10}"
    )
    for mode in modes:
        cg = None
        if args.warm:
            memcap.warm_files(files)
        elif method.startswith("cgroup"):
            cg, _ = memcap.make_cgroup(f"rabbit-readpaths-{os.getpid()}-{mode}")
            cg.set_limit(cap)

        def pre(cg=cg):
            if cg:
                cg.preexec()
            if args.nice:
                os.nice(args.nice)

        command = [sys.executable, "-m", "tools.rabbit_bench.readpaths", args.ckpt]
        command += ["--child", mode, "--tokens", str(args.tokens), "--depth", str(args.depth)]
        command += ["--workers", str(args.workers), "--threads", str(args.threads)]
        command += ["--ballast-mb", str(args.ballast_mb)]
        proc = subprocess.run(
            command,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            preexec_fn=pre,  # noqa: PLW1509 - no threads here
            check=False,
        )
        stats = cg.stats() if cg else {}
        if cg:
            cg.remove()
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode:<24} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            continue
        res = json.loads(line[7:])
        steps, cpu = res["steps"][1:] or res["steps"], res["cpu"][1:] or res["cpu"]
        hits = stats.get("failcnt")
        print(
            f"{mode:<24} {statistics.median(steps):>10.3f} ({min(steps):.2f}-{max(steps):.2f})"
            f"{'':>13} {statistics.median(c[0] for c in cpu):>7.2f} "
            f"{statistics.median(c[1] for c in cpu):>7.2f} {'-' if hits is None else hits:>10}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
