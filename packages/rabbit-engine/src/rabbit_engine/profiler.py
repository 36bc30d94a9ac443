"""Per-step timing of the streaming pipeline, reported with its bottleneck.

Categories: `read` (storage -> host bytes, in the prefetch thread), `wait` (the compute thread blocked
on a layer that was not ready: I/O not hidden), `convert` (bytes -> tensors, casts), `copy` (host ->
device), `compute` (the forward pass minus waits and loads done in the compute thread).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

CATEGORIES = ("read", "wait", "convert", "copy", "compute")


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

    def step_end(self, tokens: int) -> None:
        if not self.enabled or self._step_start is None:
            return
        total = time.perf_counter() - self._step_start
        with self._lock:
            step = dict(self._current)
            step["compute"] = max(0.0, total - step.get("wait", 0.0) - self._main_thread_load)
            step["total"] = total
            step["tokens"] = float(tokens)
            self._steps.append(step)
            self._current = defaultdict(float)
        self._step_start = None

    def report(self) -> dict:
        """Totals and per-step figures split into prefill (first step) and decode (the rest)."""
        with self._lock:
            steps = list(self._steps)
        if not steps:
            return {"steps": 0, "bottleneck": None}

        def summarize(chunk: list[dict[str, float]]) -> dict[str, float]:
            n = max(len(chunk), 1)
            return {c: sum(s.get(c, 0.0) for s in chunk) / n for c in (*CATEGORIES, "total", "tokens")}

        decode = steps[1:]
        per_step = summarize(decode or steps)
        # Background reads overlap compute; only what the compute thread waited for is exposed.
        exposed = {"I/O (waiting for reads)": per_step["wait"], "compute": per_step["compute"],
                   "convert": per_step["convert"], "copy to device": per_step["copy"]}
        bottleneck = max(exposed, key=exposed.get)
        return {
            "steps": len(steps),
            "prefill": summarize(steps[:1]),
            "decode_per_step": per_step if decode else None,
            "bottleneck": bottleneck,
            "summary": (
                f"decode step {per_step['total']:.3f}s: compute {per_step['compute']:.3f}s, waiting for I/O "
                f"{per_step['wait']:.3f}s, read {per_step['read']:.3f}s (background), convert "
                f"{per_step['convert']:.3f}s, copy {per_step['copy']:.3f}s; bottleneck: {bottleneck}"
            ),
        }
