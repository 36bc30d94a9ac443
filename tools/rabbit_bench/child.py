"""One engine, one regime, in its own process: load, prefill, N timed decode steps, report.

Run as `python -m tools.rabbit_bench --child SPEC.json`; writes SPEC['result'] (JSON) and
SPEC['logits'] (float32 last-position logits of every step, raw little-endian). Imports of torch
and the engines happen here, never in the parent, so RSS and caches are this process's own.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

from . import memcap

_STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def read_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in _STATUS_KEYS:
                out[key] = int(rest.split()[0]) * 1024
    return out


class MemorySampler:
    """Polls /proc/self/status (VmHWM is the kernel's own peak RSS; RssAnon has no peak, so we
    poll)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = {k: 0 for k in _STATUS_KEYS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-mem", daemon=True)

    def sample(self) -> None:
        for k, v in read_status().items():
            self.peak[k] = max(self.peak[k], v)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def io_read_bytes() -> int | None:
    """Bytes this process made the kernel fetch from storage (readahead included)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def thread_faults() -> dict[int, tuple[int, int]]:
    """tid -> (minor, major) page faults of every thread of this process."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (int(fields[7]), int(fields[9]))  # minflt, majflt
    return out


def background_tids() -> set[int]:
    """The engine's own helper threads (prefetch, readers): faults there are hidden I/O."""
    return {
        t.native_id
        for t in threading.enumerate()
        if t.native_id and t is not threading.main_thread() and not t.name.startswith("bench-")
    }


class StepCounters:
    """Storage bytes read and page faults (compute threads vs the engine's helper threads) and CPU
    time in each decode step."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def begin(self) -> None:
        self._io = io_read_bytes()
        self._faults = thread_faults()
        self._ru = resource.getrusage(resource.RUSAGE_SELF)

    def end(self) -> None:
        io = io_read_bytes()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        faults = thread_faults()
        helpers = background_tids()
        row = {
            "read_bytes": (io - self._io) if io is not None and self._io is not None else None,
            "majflt_compute": 0,
            "majflt_helpers": 0,
            "minflt_compute": 0,
            "minflt_helpers": 0,
            "cpu_user_s": ru.ru_utime - self._ru.ru_utime,
            "cpu_sys_s": ru.ru_stime - self._ru.ru_stime,
        }
        for tid, (mn, mj) in faults.items():
            mn0, mj0 = self._faults.get(tid, (0, 0))
            side = "helpers" if tid in helpers else "compute"
            row[f"majflt_{side}"] += mj - mj0
            row[f"minflt_{side}"] += mn - mn0
        self.rows.append(row)

    def medians(self) -> dict:
        if not self.rows:
            return {}
        keys = self.rows[0].keys()
        return {
            k: statistics.median(r[k] for r in self.rows)
            if all(r[k] is not None for r in self.rows)
            else None
            for k in keys
        }


def disk_device_map(path: str, resident: int | str) -> dict:
    """Every decoder layer on "disk", everything else (embeddings, norm, head, rotary) on
    `resident`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    layers = None
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == config.num_hidden_layers:
            layers = name
            break
    if layers is None:
        raise ValueError("cannot find the decoder-layer list for accelerate's device_map")
    device_map: dict = {}

    def walk(prefix: str, module) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if full == layers:
                device_map.update({f"{full}.{i}": "disk" for i in range(len(child))})
            elif layers.startswith(full + "."):
                walk(full, child)
            else:
                device_map[full] = resident
        for pname, _ in module.named_parameters(recurse=False):
            device_map[f"{prefix}.{pname}" if prefix else pname] = resident

    walk("", skeleton)
    return device_map


def streaming_options(spec: dict):
    """RabbitLLM's runtime options for this run, built and validated by the engine's own class
    (a bad value fails here with the message a user would see)."""
    from rabbit_engine.options import StreamingOptions

    return StreamingOptions.create(
        device=spec.get("device") or "cpu",
        dtype=None,  # the checkpoint's own, as transformers' dtype="auto" below
        max_memory=spec.get("max_memory"),
        prefetch=spec.get("prefetch", 2),
        profile=spec.get("profile", True),
    )


def load_engine(spec: dict):
    engine = spec["engine"]
    path = spec["path"]
    device = spec.get("device") or "cpu"
    if engine.startswith("rabbit"):
        from rabbitllm import AutoModel

        return AutoModel.from_pretrained(
            path, layers_path=spec.get("layers_path"), options=streaming_options(spec)
        )
    from transformers import AutoModelForCausalLM

    if engine == "transformers":
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        return model.to(device) if device != "cpu" else model
    if engine == "accelerate":
        resident = 0 if device.startswith("cuda") else "cpu"
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype="auto",
            device_map=disk_device_map(path, resident),
            offload_folder=spec["offload_folder"],
        )
    raise ValueError(f"unknown engine {engine!r}")


def run_llamacpp(spec: dict) -> dict:
    """llama.cpp's row: the same steps, counters and files as `run`, on a GGUF file mapped by
    llama.cpp (no torch imported: this process's memory is llama.cpp's own)."""
    from .llamacpp import LlamaCppModel

    out: dict = {"engine": spec["engine"], "regime": spec["regime"], "ok": False}
    files = spec["files"]
    threads = spec.get("threads") or len(os.sched_getaffinity(0))
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        model = LlamaCppModel(
            spec["path"],
            cache=Path(spec["llamacpp_cache"]),
            n_ctx=spec["prompt"] + spec["tokens"] + 8,
            threads=threads,
        )
        out["threads"] = threads
        out["import_s"] = 0.0
        out["load_s"] = time.perf_counter() - t0
        mem.sample()
        out["after_load"] = read_status()
        if spec.get("cold"):
            memcap.pageout_own_mappings(files)
            memcap.evict_files(files)
        elif spec.get("warm"):
            memcap.warm_files(files)
        out["cached_before_prefill"] = memcap.resident_fraction(files)
        counters = StepCounters()
        logits_rows: list[bytes] = []
        tokens: list[int] = []
        steps: list[float] = []
        cached_between: list[float] = []

        def step(ids: list[int], count: bool = True) -> float:
            if count:
                counters.begin()
            start = time.perf_counter()
            (row,) = model.decode(ids)
            elapsed = time.perf_counter() - start
            if count:
                counters.end()
            logits_rows.append(row.tobytes())
            tokens.append(max(range(len(row)), key=row.__getitem__))
            return elapsed

        io0 = io_read_bytes()
        out["prefill_s"] = step(list(spec["prompt_ids"]), count=False)
        out["prefill_read_bytes"] = (io_read_bytes() - io0) if io0 is not None else None
        for _ in range(spec["tokens"]):
            if spec.get("evict_each_step"):
                memcap.pageout_own_mappings(files)
                memcap.evict_files(files)
                cached_between.append(memcap.resident_fraction(files))
            steps.append(step([tokens[-1]]))
            mem.sample()
        out["decode_steps_s"] = steps
        out["decode_s"] = statistics.median(steps) if steps else None
        out["tokens"] = tokens
        out["step_counters"] = counters.rows
        out["per_step"] = counters.medians()
        out["cached_after_run"] = memcap.resident_fraction(files)
        if cached_between:
            out["cached_between_steps_max"] = max(cached_between)
        out["vocab"] = model.n_vocab
        model.close()
    out["peak"] = mem.peak
    Path(spec["logits"]).write_bytes(b"".join(logits_rows))
    out["ok"] = True
    return out


def run(spec: dict) -> dict:
    if spec["engine"].startswith("llamacpp"):
        return run_llamacpp(spec)
    out: dict = {"engine": spec["engine"], "regime": spec["regime"], "ok": False}
    files = spec.get("files", [])
    evict_each_step = spec.get("evict_each_step", False)
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        import torch
        from transformers import DynamicCache

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        out["threads"] = torch.get_num_threads()
        out["import_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = load_engine(spec)
        model.eval()
        out["load_s"] = time.perf_counter() - t0
        mem.sample()
        out["after_load"] = read_status()

        live_files = list(files)
        offload = Path(spec["offload_folder"]) if spec.get("offload_folder") else None
        if offload is not None and offload.exists():  # accelerate's own copies, when it writes any
            live_files += [str(p) for p in offload.rglob("*") if p.is_file()]
        out["offload_files"] = len(live_files) - len(files)
        if spec.get("cold"):
            memcap.pageout_own_mappings(live_files)
            memcap.evict_files(live_files)
        elif spec.get("warm"):
            memcap.warm_files(live_files)
        out["cached_before_prefill"] = memcap.resident_fraction(live_files) if live_files else None

        import inspect

        params = inspect.signature(model.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        device = getattr(model, "device", torch.device("cpu"))
        vocab = model.config.vocab_size
        prompt = torch.tensor([spec["prompt_ids"]], device=device)
        cache = DynamicCache(config=model.config)
        logits_rows = []
        tokens: list[int] = []
        steps: list[float] = []
        cached_between: list[float] = []

        counters = StepCounters()

        def step(ids, count=True):
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            if count:
                counters.begin()
            start = time.perf_counter()
            with torch.inference_mode():
                res = model(input_ids=ids, use_cache=True, **{cache_kw: cache}, **extra)
            sync()
            elapsed = time.perf_counter() - start
            if count:
                counters.end()
            row = res.logits[0, -1].float().cpu()
            logits_rows.append(row.numpy().tobytes())
            tokens.append(int(row.argmax()))
            return elapsed

        io0 = io_read_bytes()
        out["prefill_s"] = step(prompt, count=False)
        out["prefill_read_bytes"] = (io_read_bytes() - io0) if io0 is not None else None
        for _ in range(spec["tokens"]):
            if evict_each_step:
                memcap.pageout_own_mappings(live_files)
                memcap.evict_files(live_files)
                cached_between.append(memcap.resident_fraction(live_files))
            steps.append(step(torch.tensor([[tokens[-1]]], device=device)))
            mem.sample()
        out["decode_steps_s"] = steps
        out["decode_s"] = statistics.median(steps) if steps else None
        out["tokens"] = tokens
        out["step_counters"] = counters.rows
        out["per_step"] = counters.medians()
        out["cached_after_run"] = memcap.resident_fraction(live_files) if live_files else None
        if cached_between:
            out["cached_between_steps_max"] = max(cached_between)
        if hasattr(model, "profile_report"):
            try:
                out["profile"] = model.profile_report()
            except Exception as e:  # noqa: BLE001 - the bench reports, never dies on the profiler
                out["profile"] = {"error": repr(e)}
        if hasattr(model, "streamer_stats"):
            try:
                out["streamer_stats"] = model.streamer_stats
            except Exception as e:  # noqa: BLE001
                out["streamer_stats"] = {"error": repr(e)}
        try:
            import psutil

            full = psutil.Process().memory_full_info()
            out["uss_end"] = full.uss
        except Exception:  # noqa: BLE001
            out["uss_end"] = None
        if hasattr(model, "close"):
            model.close()
    out["peak"] = mem.peak
    Path(spec["logits"]).write_bytes(b"".join(logits_rows))
    out["vocab"] = vocab
    out["ok"] = True
    return out


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run(spec)
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        result = {
            "engine": spec["engine"],
            "regime": spec["regime"],
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
    Path(spec["result"]).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0 if result.get("ok") else 1)  # skip interpreter teardown (threads, mmaps)
