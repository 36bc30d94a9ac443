"""Per-step timing of the streaming pipeline, reported with its bottleneck.

Categories: `read` (storage -> host bytes, in the prefetch thread), `wait` (the compute thread
blocked on a layer that was not ready: I/O not hidden), `convert` (bytes -> tensors, casts), `copy`
(host -> device), `compute` (the forward pass minus waits and loads done in the compute thread).
`loaded_inline` is the part of read/convert/copy done by the compute thread itself: layers nobody
read ahead (the first streamed layer of the first pass; free views of a cached local file).

`compute` alone cannot tell a step that computes from one whose compute thread is blocked in page
faults on mapped weights (the cold regime) or descheduled by other processes: both look like time
spent in torch. So the compute thread's own CPU time and page faults are taken from
`getrusage(RUSAGE_THREAD)` (Linux; two syscalls per step) and `compute` is split into `compute_cpu`
and `stalled`, with the major faults and the bytes the compute thread itself read from storage.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

CATEGORIES = ("read", "wait", "convert", "copy", "compute")
_THREAD_USAGE = getattr(resource, "RUSAGE_THREAD", None)  # Linux only
_BLOCK = 512  # ru_inblock counts 512-byte blocks


def _thread_usage() -> tuple[float, int, int] | None:
    """(CPU seconds, major faults, bytes read from storage) of the calling thread so far."""
    if _THREAD_USAGE is None:
        return None
    u = resource.getrusage(_THREAD_USAGE)
    return u.ru_utime + u.ru_stime, u.ru_majflt, u.ru_inblock * _BLOCK


class Profiler:
    """Cheap when disabled: `section()` returns at once."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._steps: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        self._step_start: float | None = None
        self._main_thread_load = 0.0
        self._compute_thread: int | None = None
        self._usage_start: tuple[float, int, int] | None = None

    @contextmanager
    def section(self, category: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._current[category] += elapsed
                if threading.get_ident() == self._compute_thread and category != "wait":
                    self._main_thread_load += elapsed

    def step_begin(self) -> None:
        if self.enabled:
            self._step_start = time.perf_counter()
            self._main_thread_load = 0.0
            self._compute_thread = threading.get_ident()  # loads done here are not compute
            self._usage_start = _thread_usage()

    def step_end(self, tokens: int) -> None:
        if not self.enabled or self._step_start is None:
            return
        total = time.perf_counter() - self._step_start
        usage = _thread_usage()
        with self._lock:
            step = dict(self._current)
            step["compute"] = max(0.0, total - step.get("wait", 0.0) - self._main_thread_load)
            step["loaded_inline"] = self._main_thread_load
            if usage is not None and self._usage_start is not None:
                cpu, majflt, read = (
                    now - then for now, then in zip(usage, self._usage_start, strict=True)
                )
                # CPU spent on loads in this thread is not compute either (waits burn none)
                step["compute_cpu"] = min(step["compute"], max(0.0, cpu - self._main_thread_load))
                step["stalled"] = step["compute"] - step["compute_cpu"]
                step["fault_majors"] = float(majflt)
                step["fault_bytes"] = float(read)
            step["total"] = total
            step["tokens"] = float(tokens)
            self._steps.append(step)
            self._current = defaultdict(float)
        self._step_start = None

    @property
    def steps(self) -> list[dict[str, float]]:
        """Each step's figures so far, in order, with every category: what `report` sums up."""
        with self._lock:
            return [{**dict.fromkeys(CATEGORIES, 0.0), **step} for step in self._steps]

    def report(self) -> dict:
        """Totals and per-step figures split into prefill (first step) and decode (the rest)."""
        steps = self.steps
        if not steps:
            return {"steps": 0, "bottleneck": None}

        def summarize(chunk: list[dict[str, float]]) -> dict[str, float]:
            n = max(len(chunk), 1)
            keys = {*CATEGORIES, "total", "tokens", *(k for s in chunk for k in s)}
            return {c: sum(s.get(c, 0.0) for s in chunk) / n for c in sorted(keys)}

        decode = steps[1:]
        per_step = summarize(decode or steps)
        # Background reads overlap compute; only what the compute thread waited for is exposed.
        exposed = {
            "I/O (waiting for reads)": per_step["wait"],
            "compute": per_step["compute"],
            "convert": per_step["convert"],
            "copy to device": per_step["copy"],
        }
        compute_text = f"compute {per_step['compute']:.3f}s"
        if "stalled" in per_step:
            exposed["compute"] = per_step["compute_cpu"]
            # Off-CPU time inside compute: the thread blocked in page faults (it read from storage
            # itself) or, with no faults, descheduled by other work on the machine.
            stall = (
                "I/O in page faults (compute thread)"
                if per_step["fault_bytes"] > 0
                else "stalls (compute thread off CPU)"
            )
            exposed[stall] = per_step["stalled"]
            compute_text += (
                f" (CPU {per_step['compute_cpu']:.3f}s, stalled {per_step['stalled']:.3f}s; "
                f"{per_step['fault_majors']:.0f} major faults, "
                f"{per_step['fault_bytes'] / 2**20:.1f} MiB read in faults)"
            )
        bottleneck = max(exposed, key=exposed.get)
        return {
            "steps": len(steps),
            "prefill": summarize(steps[:1]),
            "decode_per_step": per_step if decode else None,
            "bottleneck": bottleneck,
            "summary": (
                f"decode step {per_step['total']:.3f}s: {compute_text}, waiting for I/O "
                f"{per_step['wait']:.3f}s, read {per_step['read']:.3f}s (background), convert "
                f"{per_step['convert']:.3f}s, copy {per_step['copy']:.3f}s; "
                f"bottleneck: {bottleneck}"
            ),
        }
