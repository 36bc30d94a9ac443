#!/usr/bin/env python
"""Side-by-side decode benchmark: RabbitLLM vs transformers vs accelerate's disk offload.

Makes (or reuses) a Llama-shaped random bf16 checkpoint, then runs every engine in its own process
in up to three regimes and prints one table with the ratio of each decode step to that regime's floor:

  cold      larger than memory: each engine's memory, page cache included, is capped below the
            model's size (a child memory cgroup), so every token re-reads the weights from disk.
            Without a usable cgroup, the child evicts the files' pages after every step instead.
            floor = decoder-layer bytes / cold sequential read bandwidth measured under the same cap.
            Engine `rabbit-auto` (this regime only) is RabbitLLM with max_memory="auto": it keeps as
            many layers in memory as the cgroup allows and streams the rest; its floor counts only
            the bytes it streams.
  warm      files in the page cache, RabbitLLM streams every layer (max_memory=None).
            floor = transformers' in-memory decode step, measured in the same run.
  resident  RabbitLLM with a budget >= the model: everything stays resident.
            floor = transformers' in-memory decode step, measured in the same run.

Only ratios measured side by side in one run mean anything; absolute times depend on the machine
and on whatever else it is doing (the load average is printed with the results).

  python tools/bench.py                       # ~2 GB model, every engine and regime
  python tools/bench.py --quick               # a few-MB model: smoke test of the whole harness
  python tools/bench.py --regimes cold --engines rabbit,accelerate --tokens 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_lib import memcap
from bench_lib.checkpoint import QUICK, Shape, checkpoint_files, shape_for_size

# rabbit-auto: RabbitLLM with max_memory="auto" (cold regime only): as many layers resident as the
# cgroup's memory allows, the rest streamed; its floor counts only the bytes it streams.
ENGINES = ("rabbit", "rabbit-split", "rabbit-auto", "transformers", "accelerate")
REGIMES = ("cold", "warm", "resident")
REGIME_ALIASES = {"1": "cold", "2": "warm", "3": "resident"}
REGIME_ENGINES = {  # accelerate with everything in memory is transformers itself
    "cold": ENGINES,
    "warm": tuple(e for e in ENGINES if e != "rabbit-auto"),
    "resident": ("rabbit", "rabbit-split", "transformers"),
}
GOALS = {"cold": 1.15, "warm": 1.15, "resident": 1.05}
MIN_CAP = (
    512 << 20
)  # below this a cgroup cap would starve python+torch itself: evict per step instead
GIB = 2**30
MB = 10**6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- checkpoint facts without torch ---------------------------------------------------------------
def safetensors_sizes(files) -> dict[str, int]:
    sizes = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                sizes[key] = end - start
    return sizes


_LAYER_KEY = re.compile(r"^(.*?(?:layers|layer|h|blocks|block))\.(\d+)\.")


def layer_facts(files) -> dict:
    sizes = safetensors_sizes(files)
    layers: dict[int, int] = {}
    resident = 0
    for key, n in sizes.items():
        m = _LAYER_KEY.match(key)
        if m:
            layers[int(m.group(2))] = layers.get(int(m.group(2)), 0) + n
        else:
            resident += n
    return {
        "layer_bytes": sum(layers.values()),
        "largest_layer": max(layers.values(), default=0),
        "num_layers": len(layers),
        "resident_bytes": resident,
        "total_bytes": sum(sizes.values()),
        "layer_sizes": [layers[i] for i in sorted(layers)],
    }


# ---- machine ----------------------------------------------------------------------------------------
def machine_info(workdir: Path) -> dict:
    info = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        meminfo = dict(
            line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()
        )
        info["ram_gib"] = round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The block device holding the workdir.
    try:
        dev = os.stat(workdir).st_dev
        major, minor = os.major(dev), os.minor(dev)
        sys_dev = Path(f"/sys/dev/block/{major}:{minor}").resolve()
        disk = sys_dev if (sys_dev / "queue").exists() else sys_dev.parent
        info["disk"] = disk.name
        q = disk / "queue"
        info["disk_rotational"] = (q / "rotational").read_text().strip() == "1"
        info["read_ahead_kb"] = int((q / "read_ahead_kb").read_text())
        info["scheduler"] = (q / "scheduler").read_text().strip()
    except (OSError, ValueError):
        pass
    try:
        for mnt_line in Path("/proc/mounts").read_text().splitlines():
            parts = mnt_line.split()
            if len(parts) > 2 and parts[1] == "/":
                info["root_fs"] = f"{parts[0]} {parts[2]}"
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(
            [
                "git",
                "-C",
                str(HERE),
                "log",
                "-1",
                "--format=%h %cd",
                "--date=format:%Y-%m-%d %H:%M",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in (
        "torch",
        "transformers",
        "accelerate",
        "safetensors",
        "rabbitllm",
        "rabbit-engine",
        "rabbit-store",
    ):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001, S110 - a missing package is just not listed
            pass
    return info


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")


# ---- children ---------------------------------------------------------------------------------------
def spawn(
    args: list[str], *, cgroup: memcap.Cgroup | None, timeout: float, log_path: Path, nice: int = 0
) -> tuple[int, float]:
    def preexec() -> None:
        if cgroup is not None:
            cgroup.preexec()
        if nice:
            os.nice(nice)

    start = time.perf_counter()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec if cgroup or nice else None,  # noqa: PLW1509 - no threads here
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = -999
    return rc, time.perf_counter() - start


def tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class Runner:
    def __init__(
        self, args, ckpt: Path, split_dir: Path | None, facts: dict, workdir: Path
    ) -> None:
        self.args = args
        self.ckpt = ckpt
        self.split_dir = split_dir
        self.facts = facts
        self.workdir = workdir
        self.tmp = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
        self.files = [str(p) for p in checkpoint_files(ckpt)]
        self.split_files = [str(p) for p in checkpoint_files(split_dir)] if split_dir else []

    def new_cgroup(self, tag: str, cap: int):
        cg, why = memcap.make_cgroup(f"rabbit-bench-{os.getpid()}-{tag}")
        if cg is None:
            raise RuntimeError(f"cgroup: {why}")
        cg.set_limit(cap)
        return cg

    def bandwidth(self, regime: dict) -> dict:
        """Cold sequential read bandwidth of the checkpoint, under the same cap as the engines."""
        spec = {"files": self.files, "repeat": 2, "result": str(self.tmp / "bw.json")}
        spec_path = self.tmp / "bw-spec.json"
        spec_path.write_text(json.dumps(spec))
        cg = self.new_cgroup("bw", regime["cap"]) if regime["method"].startswith("cgroup") else None
        try:
            rc, _ = spawn(
                ["--child-bw", str(spec_path)],
                cgroup=cg,
                timeout=900,
                log_path=self.tmp / "bw.log",
                nice=self.args.nice,
            )
        finally:
            if cg:
                cg.remove()
        if rc != 0:
            raise RuntimeError(f"bandwidth child failed (rc {rc}): {tail(self.tmp / 'bw.log')}")
        return json.loads(Path(spec["result"]).read_text())

    def run(self, engine: str, regime: dict, rep: int = 0) -> dict:
        name = regime["name"]
        tag = f"{engine}-{name}-{rep}"
        spec = {
            "engine": engine,
            "regime": name,
            "path": str(self.ckpt),
            "device": self.args.device,
            "tokens": self.args.tokens,
            "prompt": self.args.prompt,
            "seed": self.args.seed,
            "prefetch": self.args.prefetch,
            "profile": not self.args.no_profile,
            "threads": self.args.threads,
            "result": str(self.tmp / f"{tag}.json"),
            "logits": str(self.tmp / f"{tag}.logits"),
            "files": self.files,
        }
        if engine == "rabbit-split":
            if self.split_dir is None:
                return {
                    "engine": engine,
                    "regime": name,
                    "ok": False,
                    "error": "no split directory (split failed)",
                }
            spec["layers_path"] = str(self.split_dir)
            spec["files"] = self.split_files
        if engine == "accelerate":
            offload = self.tmp / f"offload-{name}"
            shutil.rmtree(offload, ignore_errors=True)
            spec["offload_folder"] = str(offload)
        if engine == "rabbit-auto":
            spec["max_memory"] = "auto"
        if engine.startswith("rabbit") and name == "resident":
            spec["max_memory"] = int(self.facts["total_bytes"] * 1.25) + (256 << 20)
        cg = None
        if name == "cold":
            spec["cold"] = True
            spec["evict_each_step"] = regime["method"] == "evict"
            if self.args.drop_caches:
                regime["dropped_caches"] = memcap.drop_caches()
            memcap.evict_files(spec["files"])
            if regime["method"].startswith("cgroup"):
                cg = self.new_cgroup(tag, regime["cap"])
        else:
            spec["warm"] = True
            memcap.warm_files(spec["files"])
        spec_path = self.tmp / f"{tag}-spec.json"
        spec_path.write_text(json.dumps(spec))
        log(f"  {tag} ...")
        load_start = loadavg()
        try:
            rc, wall = spawn(
                ["--child", str(spec_path)],
                cgroup=cg,
                timeout=self.args.child_timeout,
                log_path=self.tmp / f"{tag}.log",
                nice=self.args.nice,
            )
            cg_stats = cg.stats() if cg else None
        finally:
            if cg:
                cg.remove()
            if engine == "accelerate" and not self.args.keep:
                shutil.rmtree(spec.get("offload_folder", ""), ignore_errors=True)
        result_path = Path(spec["result"])
        if result_path.exists():
            res = json.loads(result_path.read_text())
        else:
            why = "timed out" if rc == -999 else f"exited with {rc}"
            if rc == -9 and cg_stats and cg_stats.get("failcnt"):
                why = f"killed by the OOM killer under the {regime['cap'] / GIB:.2f} GiB cap"
            res = {
                "engine": engine,
                "regime": name,
                "ok": False,
                "error": f"{why}: {tail(self.tmp / f'{tag}.log')}",
            }
        res["wall_s"] = wall
        res["cgroup"] = cg_stats
        res["load1"] = [load_start, loadavg()]
        res["logits_path"] = spec["logits"]
        if not res.get("ok"):
            log(f"    failed: {res.get('error', '')[:300]}")
        return res


def merge_repeats(runs: list[dict]) -> dict:
    """One row from --repeat runs: median over every decode step of every run, worst peaks."""
    if len(runs) == 1:
        return runs[0]
    good = [r for r in runs if r.get("ok")]
    if len(good) != len(runs):
        bad = next(r for r in runs if not r.get("ok"))
        return {**bad, "repeats": runs}
    out = dict(good[0])
    steps = [t for r in good for t in r["decode_steps_s"]]
    out["decode_steps_s"] = steps
    out["decode_s"] = statistics.median(steps)
    out["prefill_s"] = statistics.median(r["prefill_s"] for r in good)
    out["peak"] = {k: max(r["peak"].get(k, 0) for r in good) for k in good[0]["peak"]}
    out["tokens_all_runs_equal"] = all(r["tokens"] == good[0]["tokens"] for r in good)
    rows = [row for r in good for row in r.get("step_counters", [])]
    if rows:
        out["per_step"] = {
            k: statistics.median(row[k] for row in rows)
            if all(row[k] is not None for row in rows)
            else None
            for k in rows[0]
        }
    cg = [r["cgroup"] for r in good if r.get("cgroup")]
    if cg:
        out["cgroup"] = {
            "peak_bytes": max(c.get("peak_bytes") or 0 for c in cg),
            "failcnt": max(c.get("failcnt") or 0 for c in cg),
        }
    out["load1"] = [good[0]["load1"][0], good[-1]["load1"][1]]
    out["repeats"] = [
        {k: r.get(k) for k in ("decode_s", "prefill_s", "load1", "tokens")} for r in good
    ]
    return out


def make_split(ckpt: Path, workdir: Path, fresh: bool) -> tuple[Path | None, str]:
    dst = workdir / f"{ckpt.name}-split"
    if (dst / "rabbit-split.json").exists() and not fresh:
        return dst, ""
    shutil.rmtree(dst, ignore_errors=True)
    code = (
        "import sys; from rabbit_store.split import split_checkpoint; "
        "split_checkpoint(sys.argv[1], sys.argv[2])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ckpt), str(dst)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not (dst / "rabbit-split.json").exists():
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        return None, lines[-1] if lines else f"split exited with {proc.returncode}"
    return dst, ""


# ---- comparison and table ---------------------------------------------------------------------------
def read_logits(path: str, vocab: int) -> list[array]:
    raw = array("f")
    try:
        raw.frombytes(Path(path).read_bytes())
    except OSError:
        return []
    if sys.byteorder != "little":
        raw.byteswap()
    return [raw[i : i + vocab] for i in range(0, len(raw), vocab)]


def compare(res: dict, ref: dict | None) -> None:
    if not res.get("ok") or ref is None or not ref.get("ok"):
        res["tokens_equal"] = None
        res["max_abs_logit_diff"] = None
        return
    res["tokens_equal"] = res["tokens"] == ref["tokens"] and res.get("tokens_all_runs_equal", True)
    mine, theirs = (
        read_logits(res["logits_path"], res["vocab"]),
        read_logits(ref["logits_path"], ref["vocab"]),
    )
    worst = 0.0
    for i, (a, b) in enumerate(zip(mine, theirs)):
        worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
        if i >= len(res["tokens"]) or res["tokens"][i] != ref["tokens"][i]:
            break  # after the first different token the inputs differ: stop comparing
    res["max_abs_logit_diff"] = worst


def fmt(x, spec=".3f", none="-") -> str:
    return none if x is None else format(x, spec)


def mb(n) -> str:
    return "-" if not n else f"{n / MB:,.0f}"


def rss_bound(facts: dict) -> int:
    return facts["resident_bytes"] + 3 * facts["largest_layer"] + 300 * MB


def print_table(results: list[dict], regimes: dict, facts: dict) -> None:
    head = (
        f"{'engine':<13} {'regime':<9} {'prefill s':>9} {'decode s/tok':>12} {'x floor':>8} "
        f"{'cpu s/tok':>9} {'cpu x':>6} {'disk MB/tok':>11} {'peak RSS MB':>11} {'peak anon MB':>12} {'cgroup MB':>9} "
        f"{'tokens = tf':>11} {'max|dlogit|':>11} {'load':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if not r.get("ok"):
            err = (r.get("error") or "failed").replace("\n", " ")
            print(f"{r['engine']:<13} {r['regime']:<9} FAILED: {err[:160]}")
            continue
        peak = r.get("peak", {})
        cg = (r.get("cgroup") or {}).get("peak_bytes")
        eq = {True: "yes", False: "NO", None: "-"}[r.get("tokens_equal")]
        disk = (r.get("per_step") or {}).get("read_bytes")
        load = r.get("load1") or [float("nan")] * 2
        print(
            f"{r['engine']:<13} {r['regime']:<9} {r['prefill_s']:>9.3f} {r['decode_s']:>12.4f} "
            f"{fmt(r.get('ratio'), '.2f'):>8} {fmt(r.get('cpu_s'), '.3f'):>9} {fmt(r.get('cpu_ratio'), '.2f'):>6} "
            f"{mb(disk) if disk else '0':>11} {mb(peak.get('VmHWM')):>11} "
            f"{mb(peak.get('RssAnon')):>12} {mb(cg):>9} {eq:>11} {fmt(r.get('max_abs_logit_diff'), '.2g'):>11} "
            f"{load[0]:>4.1f}-{load[1]:<4.1f}"
        )
    print()
    for name, reg in regimes.items():
        print(f"floor[{name}]: {reg.get('floor_desc', '-')}")
        for r in results:
            if r["regime"] == name and r.get("streamed_bytes") is not None:
                kept = len((r.get("streamer_stats") or {}).get("resident_layers", []))
                head = f"  {r['engine']} kept {kept} of {facts['num_layers']} layers in memory"
                if r["streamed_bytes"]:
                    print(
                        f"{head}: its floor is its {mb(r['streamed_bytes'])} MB streamed / "
                        f"{reg['read_bps'] / GIB:.2f} GiB/s = {r['floor_s']:.3f} s"
                    )
                else:  # e.g. the evict method: no cap, so "auto" sees the host's free memory
                    print(f"{head}: it streams nothing, so it has no I/O floor")
    print(
        f"RSS bound for streaming rows (resident {mb(facts['resident_bytes'])} MB + 3 x largest layer "
        f"{mb(facts['largest_layer'])} MB + 300 MB) = {mb(rss_bound(facts))} MB; "
        "peak RSS = VmHWM (anonymous + touched file pages), peak anon = polled RssAnon; cgroup = the "
        "cap's own peak (anonymous + page cache charged to it); disk MB/tok = storage reads per decode step "
        "(/proc/self/io read_bytes, median); load = 1-min load average before-after the run; cpu s/tok = "
        "user + system CPU seconds of the whole process per decode step (median), cpu x = that over "
        "transformers' in the same regime (less sensitive than wall time to other load on the machine)."
    )


def evaluate(results: list[dict], regimes: dict, facts: dict) -> list[dict]:
    by = {(r["engine"], r["regime"]): r for r in results}
    goals = []

    def add(text, value, target, ok):
        goals.append({"goal": text, "value": value, "target": target, "met": ok})

    for name in regimes:
        for eng in ("rabbit", "rabbit-split", "rabbit-auto"):
            r = by.get((eng, name))
            if r and r.get("ok") and r.get("ratio") is not None:
                add(
                    f"{name}: {eng} decode <= {GOALS[name]} x floor",
                    r["ratio"],
                    GOALS[name],
                    r["ratio"] <= GOALS[name],
                )
                if name != "cold" and r.get("cpu_ratio") is not None:
                    add(
                        f"{name}: {eng} CPU per step <= {GOALS[name]} x transformers' (load-robust proxy)",
                        r["cpu_ratio"],
                        GOALS[name],
                        r["cpu_ratio"] <= GOALS[name],
                    )
        if name == "cold":
            acc = by.get(("accelerate", name))
            for eng in ("rabbit", "rabbit-split", "rabbit-auto"):
                r = by.get((eng, name))
                if r and r.get("ok") and acc and acc.get("ok"):
                    speedup = acc["decode_s"] / r["decode_s"]
                    add(
                        f"cold: {eng} >= 2x faster than accelerate disk offload",
                        speedup,
                        2.0,
                        speedup >= 2.0,
                    )
        if name in ("cold", "warm"):
            for eng in ("rabbit", "rabbit-split"):
                r = by.get((eng, name))
                if r and r.get("ok"):
                    anon = r.get("peak", {}).get("RssAnon", 0)
                    add(
                        f"{name}: {eng} peak anon RSS <= bound ({mb(rss_bound(facts))} MB)",
                        anon / MB,
                        rss_bound(facts) / MB,
                        anon <= rss_bound(facts),
                    )
    for r in results:
        if r.get("ok") and r.get("tokens_equal") is False:
            add(f"{r['regime']}: {r['engine']} tokens equal to transformers'", 0, 1, False)
    return goals


def print_goals(goals: list[dict]) -> None:
    print("\nGoals:")
    for g in goals:
        print(
            f"  [{'met ' if g['met'] else 'MISS'}] {g['goal']}: {g['value']:.2f} (target {g['target']})"
        )


def print_profiles(results: list[dict]) -> None:
    rows = [r for r in results if r.get("ok") and r.get("profile")]
    if not rows:
        return
    print("\nRabbitLLM profiler (profile=True), per decode step:")
    for r in rows:
        p = r["profile"]
        text = p.get("summary") or p.get("error") or json.dumps(p)[:200]
        stats = r.get("streamer_stats") or {}
        extra = ""
        if stats:
            extra = (
                f" [resident layers {len(stats.get('resident_layers', []))}/{stats.get('num_layers')}, "
                f"prefetch {stats.get('prefetch')}, max loaded {stats.get('max_loaded_layers')}]"
            )
        print(f"  {r['engine']:<13} {r['regime']:<9} {text}{extra}")
    rows = [r for r in results if r.get("ok") and r.get("per_step")]
    if rows:
        print(
            "\nPer decode step (median): major page faults in compute threads (main + torch workers) / in the "
            "engine's helper threads; minor faults likewise; CPU seconds of the whole process (user, system):"
        )
        for r in rows:
            c = r["per_step"]
            print(
                f"  {r['engine']:<13} {r['regime']:<9} major {c.get('majflt_compute', 0):>7.0f} / "
                f"{c.get('majflt_helpers', 0):<7.0f} minor {c.get('minflt_compute', 0):>8.0f} / "
                f"{c.get('minflt_helpers', 0):<8.0f} cpu user {fmt(c.get('cpu_user_s'), '.2f')} s, "
                f"sys {fmt(c.get('cpu_sys_s'), '.2f')} s"
            )


# ---- main -------------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
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
    ap.add_argument("--engines", default=",".join(ENGINES), help=",".join(ENGINES))
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
        "--threads", type=int, default=None, help="torch threads in every child (default: torch's)"
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
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-bw", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-checkpoint", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child_bw(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    reads, faults = [], []
    for _ in range(spec.get("repeat", 2)):
        reads.append(memcap.read_bandwidth(spec["files"])[0])
        faults.append(memcap.mmap_fault_bandwidth(spec["files"])[0])
    Path(spec["result"]).write_text(json.dumps({"read_bps": reads, "mmap_fault_bps": faults}))
    return 0


def resolve_model(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.is_dir():
        try:  # a hub id already in the local cache (or downloadable): its snapshot directory
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # noqa: BLE001
            raise SystemExit(
                f"--model {model}: not a local directory, and not found on the hub ({e})"
            ) from None
    if not checkpoint_files(path) or not (path / "config.json").exists():
        raise SystemExit(f"--model {path}: needs config.json and safetensors weights")
    return path.resolve()


def describe_model(ckpt: Path, facts: dict) -> str:
    try:
        cfg = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    arch = (cfg.get("architectures") or [cfg.get("model_type", "?")])[0]
    return (
        f"{facts['total_bytes'] / 1e9:.2f} GB {arch} ({facts['num_layers']} layers, hidden "
        f"{cfg.get('hidden_size', '?')}, intermediate {cfg.get('intermediate_size', '?')}, vocab "
        f"{cfg.get('vocab_size', '?')}, dtype {cfg.get('dtype') or cfg.get('torch_dtype') or '?'})"
    )


def prepare_checkpoint(shape: Shape, workdir: Path, fresh: bool) -> Path:
    path = workdir / shape.key
    if (path / ".bench-done").exists() and not fresh:
        return path
    spec = workdir / f"{shape.key}.shape.json"
    spec.write_text(json.dumps({"shape": asdict(shape), "fresh": fresh}))
    rc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--make-checkpoint", str(spec)], check=False
    ).returncode
    if rc != 0:
        raise SystemExit(f"checkpoint generation failed (exit {rc})")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        from bench_lib.child import main as child_main

        return child_main(args.child)
    if args.child_bw:
        return child_bw(args.child_bw)
    if args.make_checkpoint:
        from bench_lib.checkpoint import make_checkpoint

        spec = json.loads(Path(args.make_checkpoint).read_text())
        make_checkpoint(
            Shape(**spec["shape"]), Path(args.make_checkpoint).parent, fresh=spec["fresh"], log=log
        )
        return 0

    if args.tokens is None:
        args.tokens = 4 if args.quick else 8
    widths = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "seed": args.seed,
    }
    if args.quick:
        shape = QUICK
    elif args.layers:
        shape = Shape(layers=args.layers, **widths)
    else:
        shape = shape_for_size(args.size_gb, **widths)
    regimes_wanted = [
        REGIME_ALIASES.get(r.strip(), r.strip()) for r in args.regimes.split(",") if r.strip()
    ]
    engines_wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    for r in regimes_wanted:
        if r not in REGIMES:
            raise SystemExit(f"unknown regime {r!r}; choose from {', '.join(REGIMES)}")
    for e in engines_wanted:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(workdir)
    if args.model:
        ckpt = resolve_model(args.model)
    else:
        ckpt = prepare_checkpoint(shape, workdir, args.fresh)
    files = checkpoint_files(ckpt)
    facts = layer_facts(files)
    log(
        f"checkpoint {ckpt}: {facts['total_bytes'] / 1e9:.3f} GB, {facts['num_layers']} layers of "
        f"{facts['largest_layer'] / MB:.1f} MB, resident parts {facts['resident_bytes'] / MB:.1f} MB"
    )
    split_dir, split_err = None, ""
    if "rabbit-split" in engines_wanted:
        split_dir, split_err = make_split(ckpt, workdir, args.fresh)
        if split_dir is None:
            log(f"split failed: {split_err}")

    # How the cold regime is made cold.
    regimes: dict[str, dict] = {}
    for name in regimes_wanted:
        regimes[name] = {"name": name}
    if "cold" in regimes:
        cap = int(args.cap_gb * GIB) if args.cap_gb else int(0.75 * facts["total_bytes"])
        method, detail = (
            ("evict", "asked for") if args.cap_method == "evict" else memcap.probe_cap_method()
        )
        if method.startswith("cgroup") and cap < MIN_CAP:
            method, detail = (
                "evict",
                f"a cap of {cap / MB:.0f} MB (below the model's size) would not hold python+torch",
            )
        if args.cap_method == "cgroup" and not method.startswith("cgroup"):
            raise SystemExit(f"--cap-method cgroup: not possible here ({detail})")
        regimes["cold"].update(
            method=method, cap=cap if method.startswith("cgroup") else None, method_detail=detail
        )
        if method.startswith("cgroup"):
            log(
                f"cold regime: {method} memory cap {cap / GIB:.2f} GiB (model {facts['total_bytes'] / GIB:.2f} GiB), "
                f"page cache included; parent cgroup {detail}"
            )
        else:
            log(f"cold regime: evicting the checkpoint's pages after every step (no cap: {detail})")

    runner = Runner(args, ckpt, split_dir, facts, workdir)
    results: list[dict] = []
    started = time.time()
    for name in regimes_wanted:
        reg = regimes[name]
        log(f"regime {name}:")
        if name == "cold":
            bw = runner.bandwidth(reg)
            log(
                f"  cold read bandwidth before the engines: read() "
                f"{', '.join(f'{x / GIB:.2f}' for x in bw['read_bps'])} GiB/s, mmap faults "
                f"{', '.join(f'{x / GIB:.2f}' for x in bw['mmap_fault_bps'])} GiB/s"
            )
        order = [
            e
            for e in ("transformers", *ENGINES)
            if e in engines_wanted and e in REGIME_ENGINES[name]
        ]
        order = list(dict.fromkeys(order))
        runs: dict[str, list[dict]] = {eng: [] for eng in order}
        for rep in range(args.repeat):
            # Rotate the order so that no engine always runs first (or right after a cold start).
            for eng in order[rep % len(order) :] + order[: rep % len(order)]:
                runs[eng].append(runner.run(eng, reg, rep))
        results.extend(merge_repeats(rs) for rs in runs.values())
        if name == "cold":
            # Bracket the engines: the disk's speed drifts (a shared virtual disk does), and the floor
            # must be what the disk could do while they ran. Best of the two ways of reading.
            after = runner.bandwidth(reg)
            reads = bw["read_bps"] + after["read_bps"]
            faults = bw["mmap_fault_bps"] + after["mmap_fault_bps"]
            reg["bandwidth"] = {"read_bps": reads, "mmap_fault_bps": faults}
            reg["read_bps"] = max(statistics.median(reads), statistics.median(faults))
            reg["floor_s"] = facts["layer_bytes"] / reg["read_bps"]
            how = (
                f"under the {reg['cap'] / GIB:.2f} GiB {reg['method']} cap"
                if reg["cap"]
                else "after evicting (no cap)"
            )
            reg["floor_desc"] = (
                f"{facts['layer_bytes'] / MB:,.0f} MB of decoder layers / cold read {reg['read_bps'] / GIB:.2f} GiB/s "
                f"= {reg['floor_s']:.3f} s/token (best median of sequential 1 MiB read() "
                f"[{', '.join(f'{x / GIB:.2f}' for x in reads)}] and mmap page faults "
                f"[{', '.join(f'{x / GIB:.2f}' for x in faults)}] GiB/s, before and after the engines, {how})"
            )
            log(f"  floor: {reg['floor_desc']}")
        if name != "cold":
            tf = next(
                (
                    r
                    for r in results
                    if r["regime"] == name and r["engine"] == "transformers" and r.get("ok")
                ),
                None,
            )
            if tf:
                reg["floor_s"] = tf["decode_s"]
                reg["floor_desc"] = (
                    f"transformers in memory, same run: {tf['decode_s']:.4f} s/token"
                )
            else:
                reg["floor_desc"] = "transformers did not run: no floor"

    if "cold" in regimes and regimes["cold"].get("floor_s"):
        # The I/O floor ignores compute. With in-memory compute measured too, say where the cold rows
        # sit between perfect overlap (max) and no overlap at all (sum).
        compute = next(
            (
                r["decode_s"]
                for r in results
                if r["engine"] == "transformers"
                and r.get("ok")
                and r["regime"] in ("warm", "resident")
            ),
            None,
        )
        if compute:
            io = regimes["cold"]["floor_s"]
            regimes["cold"]["compute_s"] = compute
            regimes["cold"]["floor_desc"] += (
                f"; with in-memory compute {compute:.3f} s: perfect overlap "
                f"max = {max(io, compute):.3f} s, none (I/O + compute) = "
                f"{io + compute:.3f} s"
            )

    ref = next(
        (
            r
            for r in results
            if r["engine"] == "transformers" and r.get("ok") and r["regime"] != "cold"
        ),
        None,
    )
    ref = ref or next((r for r in results if r["engine"] == "transformers" and r.get("ok")), None)
    for r in results:
        compare(r, ref)
        floor = regimes[r["regime"]].get("floor_s")
        resident = (r.get("streamer_stats") or {}).get("resident_layers")
        if floor and r["regime"] == "cold" and resident:
            # Layers kept in memory are not read again: the floor is this row's streamed bytes.
            streamed = sum(n for i, n in enumerate(facts["layer_sizes"]) if i not in set(resident))
            floor = r["floor_s"] = streamed / regimes["cold"]["read_bps"]
            r["streamed_bytes"] = streamed
        r["ratio"] = r["decode_s"] / floor if r.get("ok") and floor else None
        c = r.get("per_step") or {}
        r["cpu_s"] = (c["cpu_user_s"] + c["cpu_sys_s"]) if c.get("cpu_user_s") is not None else None
    for r in results:
        tf = next(
            (
                t
                for t in results
                if t["engine"] == "transformers" and t["regime"] == r["regime"] and t.get("cpu_s")
            ),
            None,
        )
        r["cpu_ratio"] = r["cpu_s"] / tf["cpu_s"] if tf and r.get("cpu_s") else None
    if ref is None:
        log("transformers did not run: tokens cannot be compared")

    print(
        f"\nRabbitLLM bench: {describe_model(ckpt, facts)}{'' if args.model else ', random weights'}; "
        f"prompt {args.prompt} tokens, {args.tokens} decode steps (median), device {args.device}"
    )
    print(
        f"machine: {machine.get('nproc')} cpu ({machine.get('cpu', '?')}), {machine.get('ram_gib', '?')} GiB RAM, "
        f"disk {machine.get('disk', '?')} (read_ahead {machine.get('read_ahead_kb', '?')} KiB), kernel {machine['kernel']}; "
        f"load avg at start {results[0]['load1'][0] if results else float('nan'):.2f}, now {loadavg():.2f}"
        + (f"; children ran at nice {args.nice}" if args.nice else "")
        + (f"; torch threads {args.threads}" if args.threads else "")
        + (f"; code at {machine['git']}" if machine.get("git") else "")
    )
    if "cold" in regimes:
        reg = regimes["cold"]
        if args.drop_caches:
            print(
                f"page cache dropped before each cold run: {'yes' if reg.get('dropped_caches') else 'NO (not writable)'}"
            )
        print(
            f"cold regime capping: {reg['method']}"
            + (
                f", {reg['cap'] / GIB:.2f} GiB limit on each engine's process (anonymous memory + page cache)"
                if reg["cap"]
                else f" ({reg['method_detail']}): pages evicted after every step, memory not capped"
            )
        )
    if split_err:
        print(f"split directory: failed ({split_err})")
    print()
    print_table(results, regimes, facts)
    goals = evaluate(results, regimes, facts)
    print_goals(goals)
    print_profiles(results)
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
            "goals": goals,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(runner.tmp, ignore_errors=True)
    ok = all(r.get("ok") for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
