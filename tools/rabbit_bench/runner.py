"""Child processes: every engine, the bandwidth probe and the checkpoint writer run in their own.

A fresh process per engine and regime keeps RSS, page faults and caches each engine's own, and
lets the cold regime put just that process in a capped memory cgroup. Children are started as
`python -m tools.rabbit_bench --child SPEC` from the checkout's root, so they import this package
the way the parent did.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import memcap
from .checkpoint import Shape, checkpoint_files, layer_facts
from .spec import COMPRESSED, GIB, LLAMACPP, engine_spec

#: The checkout's root: children run `-m tools.rabbit_bench` from here.
REPO_ROOT = Path(__file__).resolve().parents[2]
TIMED_OUT = -999


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")


def spawn(
    args: list[str],
    *,
    cgroup: memcap.Cgroup | None = None,
    timeout: float,
    log_path: Path,
    nice: int = 0,
) -> tuple[int, float]:
    """Run `python -m tools.rabbit_bench ARGS` (in `cgroup`, at `nice`): (exit code, seconds)."""

    def preexec() -> None:
        if cgroup is not None:
            cgroup.preexec()
        if nice:
            os.nice(nice)

    start = time.perf_counter()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.rabbit_bench", *args],
            cwd=REPO_ROOT,
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
            rc = TIMED_OUT
    return rc, time.perf_counter() - start


def tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def prepare_checkpoint(shape: Shape, workdir: Path, fresh: bool) -> Path:
    """The generated checkpoint, written by a child (torch stays out of this process)."""
    path = workdir / shape.key
    if (path / ".bench-done").exists() and not fresh:
        return path
    spec = workdir / f"{shape.key}.shape.json"
    spec.write_text(json.dumps({"shape": asdict(shape), "fresh": fresh}))
    rc = subprocess.run(
        [sys.executable, "-m", "tools.rabbit_bench", "--make-checkpoint", str(spec)],
        cwd=REPO_ROOT,
        check=False,
    ).returncode
    if rc != 0:
        raise SystemExit(f"checkpoint generation failed (exit {rc})")
    return path


def make_split(ckpt: Path, workdir: Path, fresh: bool) -> tuple[Path | None, str]:
    """`rabbit split` of the checkpoint, for the rabbit-split rows: (its directory, "") or
    (None, why not)."""
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


def make_compressed(
    ckpt: Path, workdir: Path, compression: str, fresh: bool
) -> tuple[Path | None, str]:
    """RabbitLLM's compressed split of the checkpoint (`compress_checkpoint`, once, in a child:
    torch stays out of this process): (its directory, "") or (None, why not)."""
    dst = workdir / f"{ckpt.name}-{compression}"
    if (dst / "rabbit-split.json").exists() and not fresh:
        return dst, ""
    shutil.rmtree(dst, ignore_errors=True)
    code = (
        "import sys\n"
        "try:\n"
        "    from rabbit_engine.quant import compress_checkpoint\n"
        "except ImportError:  # before the package exports it\n"
        "    from rabbit_engine.quant.writer import compress_checkpoint\n"
        "compress_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ckpt), str(dst), compression],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not (dst / "rabbit-split.json").exists():
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        return None, lines[-1] if lines else f"compress_checkpoint exited with {proc.returncode}"
    return dst, ""


def make_gguf(
    ckpt: Path, workdir: Path, kind: str, fresh: bool, threads: int | None
) -> tuple[Path | None, str]:
    """The checkpoint as a GGUF file of `kind`, written and checked (gguf_export.check_gguf) in a
    child: (its path, "") or (None, why not). A file that fails its check is never kept."""
    from .gguf_export import gguf_path

    dst = gguf_path(ckpt, kind, workdir)
    check = dst.with_name(dst.name + ".check.json")
    if dst.exists() and check.exists() and not fresh:
        return dst, ""
    dst.unlink(missing_ok=True)
    check.unlink(missing_ok=True)
    spec = workdir / f"{dst.name}.spec.json"
    spec.write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt),
                "dest": str(dst),
                "kind": kind,
                "cache": str(workdir / "llamacpp"),
                "threads": threads or len(os.sched_getaffinity(0)),
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tools.rabbit_bench", "--make-gguf", str(spec)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not check.exists():
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        return None, lines[-1] if lines else f"GGUF writer exited with {proc.returncode}"
    return dst, ""


def prepare_artifacts(
    engines: list[str], ckpt: Path, workdir: Path, args: argparse.Namespace
) -> tuple[dict[str, dict], dict[str, str]]:
    """What the compressed and llama.cpp rows run on, made before any timing: engine ->
    {path, files, stream_bytes (read per token from a cold cache), facts or check}, and
    engine -> why it could not be made."""
    from .gguf_export import streamed_bytes

    made: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for eng in engines:
        if eng in COMPRESSED:
            log(f"compressed split ({COMPRESSED[eng]}) for {eng} ...")
            where, err = make_compressed(ckpt, workdir, COMPRESSED[eng], args.fresh)
            if where is not None:
                facts = layer_facts(where)
                made[eng] = {
                    "path": where,
                    "files": [str(p) for p in checkpoint_files(where)],
                    "stream_bytes": facts["layer_bytes"],
                    "facts": facts,
                }
        elif eng in LLAMACPP:
            log(f"GGUF ({LLAMACPP[eng]}) for {eng}: write and check against transformers ...")
            where, err = make_gguf(ckpt, workdir, LLAMACPP[eng], args.fresh, args.threads)
            if where is not None:
                check = json.loads(where.with_name(where.name + ".check.json").read_text())
                made[eng] = {
                    "path": where,
                    "files": [str(where)],
                    "stream_bytes": streamed_bytes(where),
                    "check": check,
                }
                log(
                    f"  {where.name}: {where.stat().st_size / 1e6:,.1f} MB; top-1 equal to "
                    f"transformers' at {check['top1_agree']}/{check['positions']} positions, "
                    f"max |dlogit| {check['logits_max_abs_diff']:.3g}"
                )
        else:
            continue
        if eng not in made:
            errors[eng] = err
            log(f"  {eng}: FAILED: {err}")
    return made, errors


def child_bandwidth(spec_path: str) -> int:
    """The bandwidth child (`--child-bw SPEC`): cold sequential reads, both ways, twice."""
    spec = json.loads(Path(spec_path).read_text())
    reads, faults = [], []
    for _ in range(spec.get("repeat", 2)):
        reads.append(memcap.read_bandwidth(spec["files"])[0])
        faults.append(memcap.mmap_fault_bandwidth(spec["files"])[0])
    Path(spec["result"]).write_text(json.dumps({"read_bps": reads, "mmap_fault_bps": faults}))
    return 0


class Runner:
    """Runs each engine (and the bandwidth probe) in a child, under the regime's conditions."""

    def __init__(
        self,
        args: argparse.Namespace,
        ckpt: Path,
        split_dir: Path | None,
        facts: dict,
        prompt_ids: list[int],
        artifacts: dict[str, dict] | None = None,
        artifact_errors: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.ckpt = ckpt
        self.split_dir = split_dir
        self.facts = facts
        self.prompt_ids = prompt_ids
        self.artifacts = artifacts or {}
        self.artifact_errors = artifact_errors or {}
        self.tmp = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
        self.files = [str(p) for p in checkpoint_files(ckpt)]
        self.split_files = [str(p) for p in checkpoint_files(split_dir)] if split_dir else []

    def new_cgroup(self, tag: str, cap: int) -> memcap.Cgroup:
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
        capped = regime["method"].startswith("cgroup")
        cg = self.new_cgroup("bw", regime["cap"]) if capped else None
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
        """One engine, one regime, one repetition: the child's result with the parent's view
        (wall time, the cgroup's peak and limit hits, the load average) added."""
        name = regime["name"]
        tag = f"{engine}-{name}-{rep}"
        if engine == "rabbit-split" and self.split_dir is None:
            error = "no split directory (split failed)"
            return {"engine": engine, "regime": name, "ok": False, "error": error}
        if engine in self.artifact_errors:
            error = self.artifact_errors[engine]
            return {"engine": engine, "regime": name, "ok": False, "error": error}
        artifact = self.artifacts.get(engine)
        spec = engine_spec(
            self.args,
            engine=engine,
            regime=regime,
            tag=tag,
            ckpt=self.ckpt,
            files=self.files,
            split_dir=self.split_dir,
            split_files=self.split_files,
            total_bytes=self.facts["total_bytes"],
            tmp=self.tmp,
            prompt_ids=self.prompt_ids,
            artifact=(artifact["path"], artifact["files"]) if artifact else None,
        )
        cg = None
        if spec.get("cold"):
            if self.args.drop_caches:
                regime["dropped_caches"] = memcap.drop_caches()
            memcap.evict_files(spec["files"])
            if regime["method"].startswith("cgroup"):
                cg = self.new_cgroup(tag, regime["cap"])
        else:
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
            why = "timed out" if rc == TIMED_OUT else f"exited with {rc}"
            if rc == -9 and cg_stats and cg_stats.get("failcnt"):
                why = f"killed by the OOM killer under the {regime['cap'] / GIB:.2f} GiB cap"
            error = f"{why}: {tail(self.tmp / f'{tag}.log')}"
            res = {"engine": engine, "regime": name, "ok": False, "error": error}
        res["wall_s"] = wall
        res["cgroup"] = cg_stats
        res["load1"] = [load_start, loadavg()]
        res["logits_path"] = spec["logits"]
        res["evicted_each_step"] = spec.get("evict_each_step", False)
        if artifact:
            res["stream_bytes"] = artifact["stream_bytes"]
            if artifact.get("facts"):
                res["own_facts"] = artifact["facts"]
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
