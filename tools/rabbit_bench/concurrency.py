"""`--concurrency 1,2,4,8,16`: aggregate throughput of C streams sharing each streamed pass.

For each regime (cold, warm) one child loads RabbitLLM streaming every layer, then for each level C
submits C equal greedy requests (the bench's prompt, --tokens new tokens each, end-of-sequence
ignored and the repetition stop off, so every request generates exactly that many tokens) to the
engine's continuous-batching scheduler and waits for all of them. Reported per level: aggregate
tokens/s, overall and after the first pass (the one that reads every prompt, which costs C prompts'
compute and would dominate the bench's few tokens), streamed passes per generated token (the
streamer's own pass counter), and the rates as multiples of one stream's. A decode pass is bound by
reading the layers, so in the cold regime C streams should cost about what one costs: the goals
are 8 streams >= 6x and 16 >= 10x one stream's decode tokens/s.

The cold regime is made cold as the main table's is: the child runs under the same memory cgroup
cap (page cache included), and the files are evicted before each level; where there is no cgroup,
or the files fit under the cap, the files are evicted before every pass instead (a forward pre-hook
in the scheduler's own thread), and the time that takes is left out of the level's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

from . import memcap
from .runner import TIMED_OUT, log, spawn, tail
from .spec import files_bytes

#: The regimes this measurement runs in (resident adds nothing: no pass reads storage).
REGIMES = ("cold", "warm")
#: Issue 12's cold-regime goals: C streams at least this many times one stream's tokens/s.
GOALS = {8: 6.0, 16: 10.0}


def parse_levels(text: str) -> list[int]:
    """`1,2,4,8,16` as sorted distinct levels; 1 is always measured (the ratios divide by it)."""
    try:
        levels = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise SystemExit(f"--concurrency {text!r}: expected integers like 1,2,4,8,16") from None
    if not levels or min(levels) < 1:
        raise SystemExit(f"--concurrency {text!r}: levels must be integers >= 1")
    return sorted(levels | {1})


# ---- parent --------------------------------------------------------------------------------------
def measure(runner, regimes: dict, levels: list[int]) -> list[dict]:
    """One child per regime wanted (cold, warm); its rows, or one failed row per regime."""
    rows: list[dict] = []
    for name in (n for n in REGIMES if n in regimes):
        regime = regimes[name]
        log(f"concurrency {','.join(map(str, levels))}, {name} regime ...")
        result = run_child(runner, regime, levels)
        if not result.get("ok"):
            log(f"  failed: {result.get('error', '')[:300]}")
            rows.append({"regime": name, "ok": False, "error": result.get("error", "")})
            continue
        rows.extend({"regime": name, "ok": True, **row} for row in result["levels"])
    set_ratios(rows)
    return rows


def child_spec(runner, regime: dict, levels: list[int]) -> dict:
    args = runner.args
    tag = f"concurrency-{regime['name']}"
    cold = regime["name"] == "cold"
    fits = bool(cold and regime["cap"] is not None and files_bytes(runner.files) <= regime["cap"])
    return {
        "engine": "rabbit",
        "regime": regime["name"],
        "path": str(runner.ckpt),
        "device": args.device,
        "prefetch": args.prefetch,
        "profile": False,
        "threads": args.threads,
        "prompt_ids": runner.prompt_ids,
        "tokens": args.tokens,
        "levels": levels,
        "files": runner.files,
        "cold": cold,
        "evict_each_step": cold and (regime["method"] == "evict" or fits),
        "result": str(runner.tmp / f"{tag}.json"),
        "tag": tag,
    }


def run_child(runner, regime: dict, levels: list[int]) -> dict:
    spec = child_spec(runner, regime, levels)
    cg = None
    if spec["cold"]:
        memcap.evict_files(spec["files"])
        if regime["method"].startswith("cgroup"):
            cg = runner.new_cgroup(spec["tag"], regime["cap"])
    else:
        memcap.warm_files(spec["files"])
    spec_path = runner.tmp / f"{spec['tag']}-spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = runner.tmp / f"{spec['tag']}.log"
    try:
        rc, _ = spawn(
            ["--child-concurrency", str(spec_path)],
            cgroup=cg,
            timeout=runner.args.child_timeout,
            log_path=log_path,
            nice=runner.args.nice,
        )
    finally:
        if cg:
            cg.remove()
    result_path = Path(spec["result"])
    if result_path.exists():
        return json.loads(result_path.read_text())
    why = "timed out" if rc == TIMED_OUT else f"exited with {rc}"
    return {"ok": False, "error": f"{why}: {tail(log_path)}"}


def set_ratios(rows: list[dict]) -> None:
    """Each level's tokens/s, overall and decode, as multiples of the same regime's one stream."""
    one = {r["regime"]: r for r in rows if r.get("ok") and r["streams"] == 1}
    for r in rows:
        base = one.get(r["regime"])
        if not (r.get("ok") and base):
            continue
        for key in ("tokens_per_s", "decode_tokens_per_s"):
            if base.get(key):
                r[key.replace("tokens_per_s", "ratio")] = r[key] / base[key]


def goals(rows: list[dict]) -> list[dict]:
    """The cold regime's goals for the levels that were measured, on decode tokens/s: the steady
    state of outputs longer than the bench's few tokens, where the prompts' pass no longer
    counts."""
    out = []
    for r in rows:
        target = GOALS.get(r.get("streams", 0))
        if r["regime"] == "cold" and target and r.get("decode_ratio") is not None:
            goal = f"cold: {r['streams']} streams >= {target:g}x the decode tokens/s of one"
            out.append(
                {"goal": goal, "value": r["decode_ratio"], "met": r["decode_ratio"] >= target}
            )
    return out


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_results(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nconcurrency: C equal greedy requests through rabbit_engine's BatchScheduler on one "
        f"streamed model (prompt {args.prompt} tokens, {args.tokens} new tokens each, eos "
        "ignored). first s = the pass that reads every prompt (and gives each its first token); "
        "tok/s = all tokens / time from submit to the last token; decode tok/s = the tokens after "
        "the first / the time after that pass; x 1 = over one stream's"
    )
    head = (
        f"{'regime':<8} {'streams':>7} {'tokens':>7} {'first s':>8} {'tok/s':>9} {'x 1':>6} "
        f"{'decode tok/s':>12} {'x 1':>6} {'passes':>7} {'passes/tok':>10}  same tokens as 1"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if not r.get("ok"):
            print(f"{r['regime']:<8} FAILED: {r.get('error', '')[:200]}")
            continue
        decode = r.get("decode_tokens_per_s")
        print(
            f"{r['regime']:<8} {r['streams']:>7} {r['tokens']:>7} {r['first_pass_s']:>8.3f} "
            f"{r['tokens_per_s']:>9.2f} {_ratio(r.get('ratio')):>6} "
            f"{'-' if decode is None else f'{decode:.2f}':>12} {_ratio(r.get('decode_ratio')):>6} "
            f"{r['passes']:>7} {r['passes_per_token']:>10.3f}  "
            f"{r['same_tokens_as_one']}/{r['streams']}"
        )
    for g in goals(rows):
        print(f"goal {g['goal']}: {'met' if g['met'] else 'MISSED'} ({g['value']:.2f}x)")


# ---- child ---------------------------------------------------------------------------------------
def child_main(spec_path: str) -> int:
    """`--child-concurrency SPEC`: every level in this process; writes SPEC['result']."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = {"ok": True, "levels": run_levels(spec)}
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        result = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
    Path(spec["result"]).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0 if result.get("ok") else 1)  # skip interpreter teardown (threads, mmaps)


class Evictor:
    """Makes the files cold; as a forward pre-hook, before every pass, timing itself so that the
    level's time can leave it out."""

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.seconds = 0.0

    def __call__(self, *_: object) -> None:
        start = time.perf_counter()
        memcap.pageout_own_mappings(self.files)
        memcap.evict_files(self.files)
        self.seconds += time.perf_counter() - start


def run_levels(spec: dict) -> list[dict]:
    import torch

    from rabbit_engine.batching.requests import SamplingParams
    from rabbit_engine.batching.scheduler import BatchScheduler

    from .child import load_engine

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = load_engine(spec)
    model.eval()
    evictor = Evictor(spec["files"])
    if spec["evict_each_step"]:
        model.register_forward_pre_hook(evictor)
    # equal lengths: no end-of-sequence token, no repetition stop, greedy
    params = SamplingParams(
        max_new_tokens=spec["tokens"], temperature=0.0, stop_on_repetition=False
    )
    rows, one_stream = [], None
    try:
        # one unmeasured request first: the first forward pays one-time costs (allocator, kernel
        # selection) that would otherwise count against the single stream and inflate every ratio
        with BatchScheduler(model, max_batch=1, max_queue=1, eos_token_ids=frozenset()) as warmup:
            warmup.submit(
                spec["prompt_ids"], dataclasses.replace(params, max_new_tokens=2)
            ).result()
        for streams in spec["levels"]:
            if spec["cold"]:
                evictor()
            else:
                memcap.warm_files(spec["files"])
            with BatchScheduler(
                model, max_batch=streams, max_queue=streams, eos_token_ids=frozenset()
            ) as scheduler:
                passes0, evicted0 = model.streamer_stats["passes"], evictor.seconds
                start = time.perf_counter()
                handles = [
                    scheduler.submit(spec["prompt_ids"], params, request_id=f"c{streams}-{i}")
                    for i in range(streams)
                ]
                for handle in handles:  # each one's first event: the pass that read its prompt
                    handle.events.get()
                first, evicted1 = time.perf_counter(), evictor.seconds
                outputs = [h.result() for h in handles]
                end = time.perf_counter()
                passes = model.streamer_stats["passes"] - passes0
            first_s = first - start - (evicted1 - evicted0)
            decode_s = end - first - (evictor.seconds - evicted1)
            wall = first_s + decode_s
            tokens = sum(len(o) for o in outputs)
            decode_tokens = tokens - streams
            if one_stream is None:
                one_stream = outputs[0]
            rows.append(
                {
                    "streams": streams,
                    "tokens": tokens,
                    "lengths": sorted({len(o) for o in outputs}),
                    "wall_s": wall,
                    "first_pass_s": first_s,
                    "tokens_per_s": tokens / wall if wall > 0 else 0.0,
                    "decode_tokens_per_s": decode_tokens / decode_s
                    if decode_tokens > 0 and decode_s > 0
                    else None,
                    "passes": passes,
                    "passes_per_token": passes / tokens if tokens else 0.0,
                    "scheduler_passes": scheduler.stats["passes"],
                    "same_tokens_as_one": sum(o == one_stream for o in outputs),
                    "evict_s": evictor.seconds - evicted0,
                    "cached_after": memcap.resident_fraction(spec["files"]),
                }
            )
            log(f"  {streams} streams: {tokens} tokens in {wall:.3f} s, {passes} passes")
    finally:
        model.close()
    return rows
