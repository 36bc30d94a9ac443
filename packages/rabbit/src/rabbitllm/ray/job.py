"""`run_batch_job`: a whole `rabbit batch` job on a Ray cluster, file in, file out.

What runs where:
- The driver (this process) reads the input, numbers its rows as `rabbit batch` numbers its lines
  and refuses duplicate ids before anything loads: that needs every id, and prompts are small next
  to the generation they cause.
- Ray Data cuts the rows into blocks of `batch_size` and hands them to `concurrency` actors, each
  running `RabbitLLMPredictor` (one model, one batch scheduler). An actor that dies is restarted
  and its block retried (Ray Data's defaults for actor pools: `max_restarts=-1`,
  `max_task_retries=-1`); a block's rows come back only once its whole result is, so a retried
  block still gives each row once (the driver checks: a row twice or missing fails the job).
- The driver puts the rows back in input order by their `line` (blocks come back as they finish;
  with two calls per actor, Ray 2.60's `preserve_order` delivered a retried block late), writes them
  as they become contiguous into a temporary file, and puts it in place at the end: a local OUT is
  renamed over (atomic), a remote one is uploaded in one piece (an object store shows the whole
  object or none). So OUT is one file, like `rabbit batch`'s, rather than the directory of part
  files Ray Data's own writers make, and a job that fails leaves no partial OUT. Results are small
  (text), so one writer is not the limit.

Formats by extension: `.jsonl` (also `.json`, `.ndjson`) and `.parquet` (also `.pq`). JSONL output
has `rabbit batch`'s rows exactly: {"id", "text", "finish_reason", "usage"} or {"id", "error":
{"message", "line", "param"}}. Parquet output has the columns of `OUTPUT_SCHEMA` (flat: the token
counts as columns, `error`/`error_param` null on rows that ran). Parquet input has a column per
request field (`prompt` or `messages`, `max_tokens`...), nulls meaning absent; its rows are
numbered from 1 as lines are (default ids `line-N`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from rabbit_store.errors import RabbitError
from rabbitllm.ray.predictor import (
    OUTPUT_SCHEMA,
    REQUEST_COLUMN,
    ROW_NUMBER_COLUMN,
    RabbitLLMPredictor,
)

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class BatchInputError(RabbitError, ValueError):
    """The job's input or output cannot be used (format, duplicate ids, a missing directory), or
    the Ray connection asked for conflicts with the one this process has."""


@dataclass(frozen=True)
class BatchJobResult:
    """What a finished job did; `seconds` is the wall time from the cluster's start (or the first
    block's submission, on a running cluster) to OUT in place, model loads included."""

    output: str
    rows: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    first_error: str | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second (the prompt's are not counted)."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def run_batch_job(
    input: str,
    output: str,
    *,
    model: str | None = None,
    address: str | None = "local",
    max_batch: int = 16,
    batch_size: int | None = None,
    concurrency: int = 1,
    num_cpus_per_worker: float | None = None,
    num_gpus_per_worker: float = 0,
    num_cpus: int | None = None,
    storage_options: dict[str, Any] | None = None,
    io_storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    predictor_class: type[RabbitLLMPredictor] = RabbitLLMPredictor,
    **predictor_options: Any,
) -> BatchJobResult:
    """Run every request of `input` on Ray and write one result row per input row to `output`.

    `address`: "local" starts a local cluster for the run (`num_cpus` CPUs, default all) and stops
    it after; "auto" joins the running cluster; "ray://host:10001" or "host:6379" a given one; None
    uses the connection this process already has (`ray.init()` called by the caller), else starts a
    local one. Each actor asks for `num_cpus_per_worker` CPUs (its torch threads; default: a local
    cluster's CPUs shared among the actors, else 1) and `num_gpus_per_worker` GPUs. `concurrency`
    actors each load the model (`model`, `storage_options` and `predictor_options`:
    RabbitLLMPredictor's keywords, e.g. `local_cache=True`, `dtype=`, `max_new_tokens=`) and run
    `max_batch` sequences per pass; each receives `batch_size` rows at a time (default 4 *
    max_batch: enough that the scheduler refills finished rows from its own queue).
    `io_storage_options` reach `input` and `output` (default: `storage_options`). `predictor_class`
    may be a subclass adding per-row work.
    """
    import ray

    if concurrency < 1:
        raise BatchInputError(f"concurrency={concurrency!r}: at least one worker is needed")
    if max_batch < 1:
        raise BatchInputError(f"max_batch={max_batch!r}: must be at least 1")
    batch_size = batch_size or 4 * max_batch
    if batch_size < 1:
        raise BatchInputError(f"batch_size={batch_size!r}: must be at least 1")
    io_options = storage_options if io_storage_options is None else io_storage_options
    in_format, out_format = data_format(input, "input"), data_format(output, "output")
    check_output(input, output, io_options)
    blocks, numbers = read_blocks(input, in_format, io_options, batch_size)
    if not numbers:
        raise BatchInputError(f"{input} holds no requests")
    started = time.perf_counter()
    if num_cpus_per_worker is None:
        # a local cluster started here is this machine: its cores go to the actors (a torch thread
        # per core); on a cluster one CPU each unless told, since nodes differ
        local = address in (None, "local") and not ray.is_initialized()
        cores = (num_cpus or os.cpu_count() or 1) if local else concurrency
        num_cpus_per_worker = max(1, cores // concurrency)
    with ray_connection(address, num_cpus):
        dataset = ray.data.from_arrow(blocks).map_batches(
            predictor_class,
            fn_constructor_kwargs={
                "model": model,
                "storage_options": storage_options,
                "max_batch": max_batch,
                **predictor_options,
            },
            compute=actor_pool(concurrency),
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=num_cpus_per_worker,
            num_gpus=num_gpus_per_worker,
        )
        totals, order = Totals(), InOrder(numbers)
        with data_context(progress), Sink(output, out_format, io_options) as sink:
            for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = order.add(block.to_pylist())
                totals.add(rows)
                sink.write(rows)
            order.finish()  # every row exactly once, or no OUT
            sink.commit()
    seconds = time.perf_counter() - started
    return BatchJobResult(
        output=output,
        rows=totals.rows,
        failed=totals.failed,
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        seconds=seconds,
        first_error=totals.first_error,
    )


def actor_pool(size: int) -> Any:
    """A fixed pool of `size` actors, each running two calls at once where Ray Data can (2.5x):
    the second block's rows wait in the scheduler's queue and fill the passes while the first
    block's last rows finish, instead of the actor idling between blocks on a half-empty batch."""
    import inspect

    import ray

    overlap = {"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True}
    accepted = inspect.signature(ray.data.ActorPoolStrategy).parameters
    if not all(name in accepted for name in overlap):
        overlap = {}
    return ray.data.ActorPoolStrategy(size=size, **overlap)


@contextlib.contextmanager
def ray_connection(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Connect as asked; shut down only a connection (and a local cluster) started here."""
    import ray

    if ray.is_initialized():
        if address is not None:
            raise BatchInputError(
                f"address={address!r}: this process is already connected to Ray; pass "
                "address=None to run on that connection"
            )
        yield
        return
    if address in (None, "local"):
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def data_context(progress: bool) -> Iterator[None]:
    """Ray Data's progress bars on or off for this job, given back afterwards: the context is
    the whole process's."""
    import ray

    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = progress
    try:
        yield
    finally:
        context.enable_progress_bars = saved


class InOrder:
    """Result rows back in input order, by their `line`, as soon as they are contiguous; a row
    that comes twice, or never, fails the job rather than the output."""

    def __init__(self, numbers: list[int]) -> None:
        self.position = {number: i for i, number in enumerate(numbers)}
        self.pending: dict[int, dict[str, Any]] = {}
        self.next = 0

    def add(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take `rows` (any order); return those now ready to write, in order."""
        for row in rows:
            position = self.position.get(row["line"])
            if position is None:
                raise RuntimeError(f"a result for line {row['line']!r}, which is not in the input")
            if position < self.next or position in self.pending:
                raise RuntimeError(f"the result of line {row['line']} came back twice")
            self.pending[position] = row
        ready = []
        while self.next in self.pending:
            ready.append(self.pending.pop(self.next))
            self.next += 1
        return ready

    def finish(self) -> None:
        if self.next < len(self.position):
            missing = len(self.position) - self.next - len(self.pending)
            line = next(n for n, i in self.position.items() if i == self.next)
            raise RuntimeError(f"{missing} results never came back (the first: line {line})")


@dataclass
class Totals:
    rows: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_error: str | None = None

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.rows += 1
            if row["error"] is not None:
                self.failed += 1
                self.first_error = self.first_error or row["error"]
            self.prompt_tokens += row["prompt_tokens"] or 0
            self.completion_tokens += row["completion_tokens"] or 0


# ---- the input -----------------------------------------------------------------------------------


def data_format(location: str, role: str) -> str:
    name = location.rstrip("/").lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    known = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    raise BatchInputError(f"{role} {location}: the format comes from the extension ({known})")


def filesystem(location: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(location, **(options or {}))


def read_blocks(
    location: str, fmt: str, options: dict[str, Any] | None, batch_size: int
) -> tuple[list[pa.Table], list[int]]:
    """The input as Arrow tables of `batch_size` rows (each a Ray Data block: the unit a worker
    takes, and retries), and the rows' numbers in input order."""
    fs, path = filesystem(location, options)
    try:
        table = (
            read_jsonl(fs, path, location) if fmt == "jsonl" else read_parquet(fs, path, location)
        )
    except FileNotFoundError as exc:
        raise BatchInputError(f"{location}: no such file") from exc
    blocks = [table.slice(start, batch_size) for start in range(0, table.num_rows, batch_size)]
    return blocks, table[ROW_NUMBER_COLUMN].to_pylist()


def read_jsonl(fs: Any, path: str, location: str) -> pa.Table:
    """Every non-blank line, with its number, as `rabbit batch` reads it; each line travels as its
    bytes (the workers parse it), so a line that is not JSON gets `rabbit batch`'s error row."""
    from rabbitllm.request_lines import parse_line

    raw = fs.cat_file(path)
    numbers: list[int] = []
    requests: list[bytes] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(raw.split(b"\n"), start=1):
        if not text.strip():
            continue
        request_id = parse_line(number, text).id
        check_unique(request_id, number, seen, location)
        numbers.append(number)
        requests.append(text)
    return pa.table(
        {
            ROW_NUMBER_COLUMN: pa.array(numbers, pa.int64()),
            REQUEST_COLUMN: pa.array(requests, pa.binary()),
        }
    )


def read_parquet(fs: Any, path: str, location: str) -> pa.Table:
    """A column per request field; the rows get their numbers (from 1) in a `line` column."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, filesystem=fs)
    if ROW_NUMBER_COLUMN in table.column_names:
        raise BatchInputError(
            f"{location}: has a column named {ROW_NUMBER_COLUMN!r}, which the job uses for row "
            "numbers; rename it"
        )
    seen: dict[str, int] = {}
    if "id" in table.column_names:
        for number, request_id in enumerate(table["id"].to_pylist(), start=1):
            check_unique(
                request_id if request_id is not None else f"line-{number}", number, seen, location
            )
    numbers = pa.array(range(1, table.num_rows + 1), pa.int64())
    return table.append_column(ROW_NUMBER_COLUMN, numbers)


def check_unique(request_id: Any, number: int, seen: dict[str, int], location: str) -> None:
    """`rabbit batch`'s rule: two rows with one id could not be told apart in OUT."""
    key = str(request_id)
    if key in seen:
        raise BatchInputError(
            f"{location}: id {request_id!r} is on line {seen[key]} and on line {number}; "
            "each request needs an id of its own"
        )
    seen[key] = number


# ---- the output ----------------------------------------------------------------------------------


def check_output(input: str, output: str, options: dict[str, Any] | None) -> None:
    """Refuse, before anything loads, an OUT that is the input or lies in a missing directory."""
    fs, path = filesystem(output, options)
    if "file" not in _protocols(fs):
        return
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise BatchInputError(f"output {output}: the directory {folder} does not exist")
    in_fs, in_path = filesystem(input, options)
    if "file" in _protocols(in_fs) and os.path.abspath(in_path) == os.path.abspath(path):
        raise BatchInputError(f"output {output} is the input file; write to another file")


def jsonl_row(row: dict[str, Any]) -> dict[str, Any]:
    """An OUTPUT_SCHEMA row as `rabbit batch` writes it."""
    if row["error"] is not None:
        return {
            "id": row["id"],
            "error": {"message": row["error"], "line": row["line"], "param": row["error_param"]},
        }
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    return {
        "id": row["id"],
        "text": row["text"],
        "finish_reason": row["finish_reason"],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


class Sink:
    """OUT, written into a local temporary file and put in place by `commit()` only."""

    def __init__(self, location: str, fmt: str, options: dict[str, Any] | None) -> None:
        self.location = location
        self.fmt = fmt
        self.fs, self.path = filesystem(location, options)
        self.local = "file" in _protocols(self.fs)
        folder = os.path.dirname(self.path) if self.local else None
        fd, self.tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=folder
        )
        os.close(fd)
        self._file: Any = None
        self._parquet: Any = None

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.tmp, OUTPUT_SCHEMA)
            self._parquet.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
            return
        from rabbitllm.cli.batch_output import encode_row

        if self._file is None:
            self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed by _close / __exit__
        self._file.write(b"".join(encode_row(jsonl_row(row)) for row in rows))

    def commit(self) -> None:
        """Put OUT in place: renamed over a local path, uploaded whole to a remote one."""
        if self.fmt == "parquet" and self._parquet is None:  # a job with no rows has none
            import pyarrow.parquet as pq

            pq.write_table(OUTPUT_SCHEMA.empty_table(), self.tmp)
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._close()
        if self.local:
            os.replace(self.tmp, self.path)
        else:
            self.fs.put_file(self.tmp, self.path)
        logger.info("wrote %s", self.location)

    def _close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def options_from_cli(args: Any, spec: Any) -> dict[str, Any]:
    """`run_batch_job`'s keywords from `rabbit batch`'s parsed flags and its ModelSpec.

    The streaming flags travel as given (not as the driver's resolved `StreamingOptions`): each
    worker resolves them on its own machine, so `--device` defaults to the worker's GPU and
    `--max-memory auto` to the worker's free memory. The default model travels as None, so each
    worker builds it in its own cache rather than looking for the driver's path.
    """
    from rabbit_engine.options import StreamingOptions

    streaming = {
        name: getattr(args, name)
        for name in StreamingOptions.names()
        if getattr(args, name, None) is not None
    }
    return {
        "model": None if spec.is_default else spec.location,
        "token": spec.token,
        "revision": spec.revision,
        "storage_options": spec.storage_options,
        "layers_path": args.layers,
        "trust_remote_code": args.trust_remote_code,
        "max_batch": args.max_batch,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop_on_repetition": args.stop_on_repetition,
        "prompt_lookup": getattr(args, "prompt_lookup", None) or 0,
        **streaming,
    }
