"""The printed results: header lines, one table row per engine and regime, floors, profiles.

docs/performance.md and the README quote this output; its columns and line shapes are kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .goals import rss_bound
from .runner import loadavg
from .spec import GIB, MB


def fmt(x: float | None, spec: str = ".3f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def mb(n: float | None) -> str:
    return "-" if not n else f"{n / MB:,.0f}"


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


def print_header(
    args: argparse.Namespace,
    *,
    ckpt: Path,
    facts: dict,
    machine: dict,
    results: list[dict],
    regimes: dict,
    split_err: str,
) -> None:
    """The model, the machine, the load and how the cold regime was made cold."""
    print(
        f"\nRabbitLLM bench: {describe_model(ckpt, facts)}"
        f"{'' if args.model else ', random weights'}; prompt {args.prompt} tokens, "
        f"{args.tokens} decode steps (median), device {args.device}"
    )
    start = results[0]["load1"][0] if results else float("nan")
    print(
        f"machine: {machine.get('nproc')} cpu ({machine.get('cpu', '?')}), "
        f"{machine.get('ram_gib', '?')} GiB RAM, disk {machine.get('disk', '?')} "
        f"(read_ahead {machine.get('read_ahead_kb', '?')} KiB), kernel {machine['kernel']}; "
        f"load avg at start {start:.2f}, now {loadavg():.2f}"
        + (f"; children ran at nice {args.nice}" if args.nice else "")
        + (f"; torch threads {args.threads}" if args.threads else "")
        + (f"; code at {machine['git']}" if machine.get("git") else "")
    )
    if "cold" in regimes:
        reg = regimes["cold"]
        if args.drop_caches:
            dropped = "yes" if reg.get("dropped_caches") else "NO (not writable)"
            print(f"page cache dropped before each cold run: {dropped}")
        if reg["cap"]:
            how = (
                f", {reg['cap'] / GIB:.2f} GiB limit on each engine's process "
                "(anonymous memory + page cache)"
            )
        else:
            how = f" ({reg['method_detail']}): pages evicted after every step, memory not capped"
        print(f"cold regime capping: {reg['method']}{how}")
    if split_err:
        print(f"split directory: failed ({split_err})")
    print()


def print_table(results: list[dict], regimes: dict, facts: dict) -> None:
    head = (
        f"{'engine':<13} {'regime':<9} {'prefill s':>9} {'decode s/tok':>12} {'x floor':>8} "
        f"{'cpu s/tok':>9} {'cpu x':>6} {'disk MB/tok':>11} {'peak RSS MB':>11} "
        f"{'peak anon MB':>12} {'cgroup MB':>9} {'tokens = tf':>11} {'max|dlogit|':>11} "
        f"{'load':>9}"
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
            f"{fmt(r.get('ratio'), '.2f'):>8} {fmt(r.get('cpu_s'), '.3f'):>9} "
            f"{fmt(r.get('cpu_ratio'), '.2f'):>6} {mb(disk) if disk else '0':>11} "
            f"{mb(peak.get('VmHWM')):>11} {mb(peak.get('RssAnon')):>12} {mb(cg):>9} {eq:>11} "
            f"{fmt(r.get('max_abs_logit_diff'), '.2g'):>11} {load[0]:>4.1f}-{load[1]:<4.1f}"
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
        for r in results:
            if r["regime"] == name and r.get("stream_bytes") is not None:
                print(f"  {r['engine']}: {own_floor_text(r, reg)}")
    print(
        f"RSS bound for streaming rows (resident {mb(facts['resident_bytes'])} MB + 3 x largest "
        f"layer {mb(facts['largest_layer'])} MB + 300 MB) = {mb(rss_bound(facts))} MB; "
        "peak RSS = VmHWM (anonymous + touched file pages), peak anon = polled RssAnon; cgroup = "
        "the cap's own peak (anonymous + page cache charged to it); disk MB/tok = storage reads "
        "per decode step (/proc/self/io read_bytes, median); load = 1-min load average "
        "before-after the run; cpu s/tok = user + system CPU seconds of the whole process per "
        "decode step (median), cpu x = that over transformers' in the same regime (less "
        "sensitive than wall time to other load on the machine)."
    )


def own_floor_text(r: dict, reg: dict) -> str:
    """How a row with bytes of its own (compressed split, GGUF file) got its floor."""
    compute = r.get("floor_compute_s")
    step = "its in-memory step " + (f"{compute:.4f} s" if compute else "not measured")
    if r.get("floor_io_s") is not None:
        evicted = "; pages evicted before every step" if r.get("evicted_each_step") else ""
        return (
            f"floor {fmt(r.get('floor_s'), '.4f')} s = max({mb(r['stream_bytes'])} MB read per "
            f"token / {reg['read_bps'] / GIB:.2f} GiB/s = {r['floor_io_s']:.4f} s, {step})"
            f"{evicted}"
        )
    if r.get("floor_s") is not None and compute is not None:
        return f"floor = {step}"
    if r["regime"] == "warm" and r["engine"].startswith("rabbit-"):
        return "no floor: its in-memory step comes from the resident regime, not run"
    return f"floor = the regime's ({fmt(reg.get('floor_s'), '.4f')} s)"


def print_artifacts(artifacts: dict[str, dict], errors: dict[str, str]) -> None:
    """The files the compressed and llama.cpp rows ran on, and llama.cpp's check against
    transformers."""
    if not artifacts and not errors:
        return
    print("\nFiles of the compressed and llama.cpp rows:")
    for eng, a in artifacts.items():
        size = sum(Path(f).stat().st_size for f in a["files"])
        line = f"  {eng:<13} {a['path']} ({size / MB:,.1f} MB, {mb(a['stream_bytes'])} MB/token)"
        check = a.get("check")
        if check:
            line += (
                f"; checked: weights as transformers reads them back within "
                f"{check['weights_max_share_of_block_amax']:.3f} of a block's largest, top-1 "
                f"equal to transformers' on {check['top1_agree']}/{check['positions']} prompt "
                f"positions, max |dlogit| {check['logits_max_abs_diff']:.2g}"
            )
        print(line)
    for eng, why in errors.items():
        print(f"  {eng:<13} FAILED: {why}")


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
                f" [resident layers {len(stats.get('resident_layers', []))}/"
                f"{stats.get('num_layers')}, prefetch {stats.get('prefetch')}, "
                f"max loaded {stats.get('max_loaded_layers')}]"
            )
        print(f"  {r['engine']:<13} {r['regime']:<9} {text}{extra}")
    rows = [r for r in results if r.get("ok") and r.get("per_step")]
    if rows:
        print(
            "\nPer decode step (median): major page faults in compute threads (main + torch "
            "workers) / in the engine's helper threads; minor faults likewise; CPU seconds of the "
            "whole process (user, system):"
        )
        for r in rows:
            c = r["per_step"]
            print(
                f"  {r['engine']:<13} {r['regime']:<9} major {c.get('majflt_compute', 0):>7.0f} / "
                f"{c.get('majflt_helpers', 0):<7.0f} minor {c.get('minflt_compute', 0):>8.0f} / "
                f"{c.get('minflt_helpers', 0):<8.0f} cpu user {fmt(c.get('cpu_user_s'), '.2f')} s, "
                f"sys {fmt(c.get('cpu_sys_s'), '.2f')} s"
            )
