"""Micro-benchmark of ways to stream decoder-layer weights from storage, engine-free.

For each strategy, a child process (in a memory cgroup capped like bench.py's cold regime, when one
can be made) walks the decoder layers of a safetensors checkpoint and runs one GEMV per weight matrix
(decode-like compute), timing each token. It isolates the read path from the engine:

  fault-file     mmap (private), compute faults the pages in, tensors taken in file order
  fault-forward  the same, tensors in forward order (q, k, v, o, gate, up, down), as a model runs them
  willneed       helper thread: madvise(MADV_WILLNEED) on the next `depth` layers; compute faults
  willneed-dontneed  the same, plus madvise(MADV_DONTNEED) on each layer after its compute
  willneed-inline-forward  the engine's pipeline since f5727a2: one WILLNEED over each of the next
                 `depth` layers' byte span, issued inline by the compute thread; compute faults in
                 forward order
  pread-cache-forward  the engine's pipeline since 1815a09: helper thread preads the next `depth`
                 layers' byte spans into the page cache (data discarded), compute does not wait for
                 it and faults the cached pages in forward order
  pread-cache-wait-forward  the same, but compute waits for the layer's read before running it
  populate       helper thread: madvise(MADV_POPULATE_READ) on the next `depth` layers, file order;
                 compute waits for it (no faults in compute)
  populate-forward   the same in forward order
  populate-ctypes  as populate, through libc's madvise via ctypes (releases the GIL; CPython's
                 mmap.madvise holds it for the whole call)
  populate-ctypes-cold     as populate-ctypes, plus madvise(MADV_COLD) on each layer after use
  populate-ctypes-pageout  the same with MADV_PAGEOUT (reclaimed at once, in the compute thread)
  populate-ctypes-willneed MADV_WILLNEED over the layer (all its reads queued), then populate
  populate-ctypes-seq      populate-ctypes on mappings marked MADV_SEQUENTIAL
  pread          helper thread: pread into a ring of depth+1 buffers, then fadvise(DONTNEED)
  direct         helper thread: O_DIRECT pread into a ring of aligned buffers
  direct-par     O_DIRECT, each layer's span in READPATHS_DIRECT_CHUNK_MB requests (default 8) from
                 READPATHS_DIRECT_THREADS threads (default 4)

Environment: READPATHS_WORKERS (helper threads, default 1), READPATHS_THREADS (torch threads),
READPATHS_BALLAST_MB (anonymous memory the child holds, to mimic an engine's resident parts).

  python tools/bench_lib/readpaths.py CKPT_DIR [--cap-gb 1.41] [--tokens 6] [--modes a,b] [--warm]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_lib import memcap
from bench_lib.checkpoint import checkpoint_files

MODES = (
    "fault-file",
    "fault-forward",
    "willneed",
    "willneed-dontneed",
    "willneed-inline-forward",
    "pread-cache-forward",
    "pread-cache-wait-forward",
    "populate",
    "populate-ctypes",
    "populate-forward",
    "populate-ctypes-cold",
    "populate-ctypes-pageout",
    "populate-ctypes-willneed",
    "populate-ctypes-seq",
    "direct-par",
    "pread",
    "direct",
)
FORWARD = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MADV_POPULATE_READ = 22
MADV_COLD, MADV_PAGEOUT = 20, 21  # after use: first in line for reclaim / reclaimed now
PAGE = mmap.PAGESIZE


def tensor_table(files):
    infos = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, v in header.items():
            if key != "__metadata__":
                s, e = v["data_offsets"]
                infos[key] = (f, 8 + n + s, 8 + n + e, v["shape"], v["dtype"])
    return infos


def child(ckpt: str, mode: str, tokens: int, depth: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("READPATHS_THREADS", "1")))
    ballast = bytearray(
        int(os.environ.get("READPATHS_BALLAST_MB", "0")) << 20
    )  # anonymous memory held  # noqa: F841
    files = [str(p) for p in checkpoint_files(Path(ckpt))]
    infos = tensor_table(files)
    num = 1 + max(int(k.split(".")[2]) for k in infos if k.startswith("model.layers."))
    layers = []
    for i in range(num):
        names = [k for k in infos if k.startswith(f"model.layers.{i}.") and len(infos[k][3]) == 2]
        names.sort(key=lambda k: infos[k][1])  # file order
        if mode.endswith("forward"):
            names.sort(
                key=lambda k: FORWARD.index(k.split(".")[-2]) if k.split(".")[-2] in FORWARD else 99
            )
        layers.append(names)
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    maps = {}
    for f in files:
        with open(f, "rb") as fh:
            maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)

    def span(k):
        f, s, e, _, _ = infos[k]
        s0 = s - s % PAGE
        return maps[f], s0, e - s0

    def view(mv, k):
        _, _, _, shape, dt = infos[k]
        return torch.frombuffer(mv, dtype=dtypes[dt]).view(shape)

    def mapped(i):
        return {
            k: view(memoryview(maps[infos[k][0]])[infos[k][1] : infos[k][2]], k) for k in layers[i]
        }

    import ctypes

    bases = {f: ctypes.addressof(ctypes.c_char.from_buffer(m)) for f, m in maps.items()}
    if mode.endswith("-seq"):  # sequential readahead for faults (instead of read-around)
        for m in maps.values():
            m.madvise(mmap.MADV_SEQUENTIAL)

    def advise(i, how):
        for k in layers[i]:
            m, s, n = span(k)
            if mode.startswith("populate-ctypes"):
                if memcap.libc().madvise(bases[infos[k][0]] + s, n, how) != 0:
                    raise OSError(ctypes.get_errno(), "madvise")
            else:
                m.madvise(how, s, n)

    biggest = max(sum(infos[k][2] - infos[k][1] + 2 * PAGE for k in ly) for ly in layers)
    ring = (
        [mmap.mmap(-1, biggest + (8 << 20)) for _ in range(depth + 1)]
        if mode in ("pread", "direct", "direct-par")
        else []
    )
    fds = {
        f: os.open(f, os.O_RDONLY | (os.O_DIRECT if mode.startswith("direct") else 0))
        for f in files
    }
    chunk_pool = ThreadPoolExecutor(int(os.environ.get("READPATHS_DIRECT_THREADS", "4")))
    CH = int(os.environ.get("READPATHS_DIRECT_CHUNK_MB", "8")) << 20

    def read_par(i):
        """The layer's span of each file, O_DIRECT, in CH-byte requests several at a time."""
        mv = memoryview(ring[i % len(ring)])
        spans = {}
        for k in layers[i]:
            f, s, e, _, _ = infos[k]
            sp = spans.setdefault(f, [s, e])
            sp[0], sp[1] = min(sp[0], s), max(sp[1], e)
        off, jobs, where = 0, [], {}
        for f, (s, e) in spans.items():
            a, b = s - s % PAGE, -(-e // PAGE) * PAGE
            where[f] = (off, a)
            for c in range(a, b, CH):
                n = min(CH, b - c)
                jobs.append((fds[f], mv[off + c - a : off + c - a + n], c))
            off += b - a
        list(chunk_pool.map(lambda j: os.preadv(j[0], [j[1]], j[2]), jobs))
        out = {}
        for k in layers[i]:
            f, s, e, _, _ = infos[k]
            o, a = where[f]
            out[k] = view(mv[o + s - a : o + e - a], k)
        return out

    def read_into(i):
        mv = memoryview(ring[i % len(ring)])
        off, out = 0, {}
        for k in layers[i]:
            f, s, e, _, _ = infos[k]
            if mode == "direct":
                a, b = s - s % PAGE, -(-e // PAGE) * PAGE
                os.preadv(fds[f], [mv[off : off + b - a]], a)
                out[k] = view(mv[off + s - a : off + e - a], k)
                off += b - a
            else:
                os.preadv(fds[f], [mv[off : off + e - s]], s)
                os.posix_fadvise(fds[f], s, e - s, os.POSIX_FADV_DONTNEED)
                out[k] = view(mv[off : off + e - s], k)
                off = -(-(off + e - s) // PAGE) * PAGE
        return out

    def job(i):
        if mode.startswith("willneed"):
            advise(i, mmap.MADV_WILLNEED)
        elif mode.startswith("populate"):
            if mode.endswith("-willneed"):  # the whole layer's reads queued at once, then mapped
                advise(i, mmap.MADV_WILLNEED)
            advise(i, MADV_POPULATE_READ)
        elif mode in ("pread", "direct"):
            return read_into(i)
        elif mode == "direct-par":
            return read_par(i)
        elif mode.startswith("pread-cache"):
            pread_span(i)
        return None

    def advise_span(i, how):
        spans = {}
        for k in layers[i]:
            f, s, e, _, _ = infos[k]
            sp = spans.setdefault(f, [s, e])
            sp[0], sp[1] = min(sp[0], s), max(sp[1], e)
        for f, (s, e) in spans.items():
            s -= s % PAGE
            maps[f].madvise(how, s, e - s)

    scratch = bytearray(8 << 20)

    def pread_span(i):
        spans = {}
        for k in layers[i]:
            f, s, e, _, _ = infos[k]
            sp = spans.setdefault(f, [s, e])
            sp[0], sp[1] = min(sp[0], s), max(sp[1], e)
        mv = memoryview(scratch)
        for f, (s, e) in spans.items():
            while s < e:
                s += os.preadv(fds[f], [mv[: min(len(mv), e - s)]], s) or (e - s)

    pool = ThreadPoolExecutor(int(os.environ.get("READPATHS_WORKERS", "1")))
    inline = "inline" in mode
    racing = mode == "pread-cache-forward"  # the helper reads ahead; compute never waits for it
    helper = not mode.startswith("fault") and not inline
    memcap.pageout_own_mappings(files)
    memcap.evict_files(files)
    steps, cpu = [], []
    for _ in range(tokens):
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        pending = {}
        for i in range(num):
            if inline:
                for j in range(i + 1, min(num, i + depth + 1)):
                    if j not in pending:
                        advise_span(j, mmap.MADV_WILLNEED)
                        pending[j] = None
            if racing:
                for j in range(i + 1, min(num, i + depth + 1)):
                    if j not in pending:
                        pending[j] = pool.submit(pread_span, j)
            elif helper:
                for j in range(i, min(num, i + depth + 1)):
                    if j not in pending and j >= i:
                        pending[j] = pool.submit(job, j)
                got = pending.pop(i).result()
            ws = got if mode in ("pread", "direct", "direct-par") else mapped(i)
            for w in ws.values():
                w @ torch.zeros(w.shape[1], dtype=w.dtype)
            if mode.endswith("dontneed"):
                advise(i, mmap.MADV_DONTNEED)
            elif mode.endswith("-cold"):
                advise(i, MADV_COLD)
            elif mode.endswith("-pageout"):
                advise(i, MADV_PAGEOUT)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        steps.append(time.perf_counter() - t0)
        cpu.append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
    return {"mode": mode, "steps": steps, "cpu": cpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--depth", type=int, default=2, help="layers read ahead by the helper thread")
    ap.add_argument(
        "--cap-gb", type=float, default=None, help="memory cap (default 0.75 x the files)"
    )
    ap.add_argument("--warm", action="store_true", help="no cap, files in the page cache")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = child(args.ckpt, args.child, args.tokens, args.depth)
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
        f"{'mode':<18} {'s/token (median, token 1 dropped)':>34} {'user s':>7} {'sys s':>7} {'limit hits':>10}"
    )
    for mode in args.modes.split(","):
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

        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                args.ckpt,
                "--child",
                mode,
                "--tokens",
                str(args.tokens),
                "--depth",
                str(args.depth),
            ],
            capture_output=True,
            text=True,
            preexec_fn=pre,
            check=False,
        )
        stats = cg.stats() if cg else {}
        if cg:
            cg.remove()
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode:<18} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            continue
        res = json.loads(line[7:])
        steps, cpu = res["steps"][1:] or res["steps"], res["cpu"][1:] or res["cpu"]
        print(
            f"{mode:<18} {statistics.median(steps):>10.3f} ({min(steps):.2f}-{max(steps):.2f}){'':>13} "
            f"{statistics.median(c[0] for c in cpu):>7.2f} {statistics.median(c[1] for c in cpu):>7.2f} "
            f"{stats.get('failcnt') if stats.get('failcnt') is not None else '-':>10}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
