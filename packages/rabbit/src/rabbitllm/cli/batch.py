"""`rabbit batch IN.jsonl -o OUT.jsonl`: many prompts at once, every weight pass shared by all.

A streamed decode step reads every streamed layer whether it computes one sequence or sixteen, so
offline work should run as many sequences per pass as it can: up to --max-batch requests run
together in the engine's batch scheduler, and a finished one is replaced by the next line at once.

Input: one JSON object per line, with OpenAI's completion fields ("prompt") or chat fields
("messages", through the model's chat template), and an optional "id" (default "line-N", N counted
from 1). Lines of OpenAI's Batch API ({"custom_id", "url", "body"}) are read too. Fields are checked
as `rabbit serve` checks them. The sampling flags are defaults for what a line leaves out, and the
model's generation_config.json fills what neither sets; a max_tokens that no line set is shortened
to fit the context, where a line's own is refused. --prompt-lookup and --draft-model verify drafts
in the shared pass, for the greedy requests.

--ray ADDRESS runs the same job on Ray Data (rabbitllm.ray, docs/scale-out.md): IN and OUT may
then be JSONL or Parquet anywhere fsspec reaches, each actor loads the model once, and OUT is
written whole at the end.

Output: one line per input line, in input order: {"id", "text", "finish_reason", "usage"}, or
{"id", "error": {"message", "line", "param"}} for a line that cannot run (the exit status is then
non-zero, with a summary on stderr). Duplicate ids in the input are refused before anything runs.

Resumable: each finished line is appended to OUT with one write() and an fsync as soon as it is
done, so a killed run loses only the requests in flight; a rerun skips the ids OUT already holds,
retries its error rows, and drops a half-written last line left by a crash. Requests finish out of
order, so OUT is rewritten in input order at the end (a temporary file renamed over it). Holding
finished lines back until the earlier ones are done would keep OUT in order throughout, but one long
request at the front would then hold every later result in memory, and a kill would lose them all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rabbitllm.cli.batch_output import OutputFile, output_lock
from rabbitllm.cli.console import Console
from rabbitllm.cli.errors import EXIT_USAGE, UsageError
from rabbitllm.cli.generation import (
    add_sampling_options,
    add_speculative_options,
    scheduler_draft,
)
from rabbitllm.cli.options import (
    add_runtime_options,
    add_source_options,
    model_spec,
    positive_int,
    runtime_options,
)
from rabbitllm.request_lines import InputLine, Job, LineError, Sampler, parse_line

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
#: New tokens per request when neither its line, the flags nor the model's generation config say.
FALLBACK_MAX_NEW_TOKENS = 256


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "batch",
        parents=[common],
        help="run every request of a JSONL file, many per weight pass (resumable)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN.jsonl", help="one request (JSON object) per line")
    p.add_argument(
        "--output",
        "-o",
        metavar="OUT.jsonl",
        required=True,
        help="results, one line per input line; a rerun skips the ids it already holds",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"requests sharing each weight pass (default: {DEFAULT_MAX_BATCH})",
    )
    ray = p.add_argument_group('on a Ray cluster (pip install "rabbitllm[ray]"; docs/scale-out.md)')
    ray.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run the job on Ray Data: 'local' (a cluster started for the run), 'auto' (the "
        "running one) or a cluster address; IN and OUT may then be JSONL or Parquet on any "
        "fsspec location (s3://...); OUT is written whole at the end (not resumable)",
    )
    ray.add_argument(
        "--ray-workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="actors, each loading the model once (default: 1)",
    )
    ray.add_argument(
        "--ray-cpus-per-worker",
        type=float,
        default=None,
        metavar="N",
        help="CPUs each actor asks for (default: a local cluster's CPUs shared among the "
        "actors, else 1)",
    )
    add_sampling_options(p, max_new_tokens=FALLBACK_MAX_NEW_TOKENS)
    add_speculative_options(p)
    add_source_options(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


# ---- the input -----------------------------------------------------------------------------------


def read_input(path: Path) -> list[InputLine]:
    """Every non-blank line of `path`, parsed; a line that is not a usable request carries its
    error instead. Duplicate ids raise UsageError naming both lines: their rows could not be
    told apart, and a rerun would skip the second as done."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    lines: list[InputLine] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(raw.split(b"\n"), start=1):
        if not text.strip():
            continue
        line = parse_line(number, text)
        if line.id in seen:
            raise UsageError(
                f"{path}: id {line.id!r} is on line {seen[line.id]} and on line {number}; "
                "each request needs an id of its own"
            )
        seen[line.id] = number
        lines.append(line)
    return lines


@dataclass
class Totals:
    """What the summary line reports."""

    done: int = 0
    failed: list[LineError] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    seconds: float = 0.0
    passes: int | None = None  # streamed passes through the layers, when the model counts them


class Progress:
    """tqdm over the requests to run, with the generated tokens per second as its postfix."""

    def __init__(self, total: int, *, disable: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="req", desc="batch", disable=disable, file=sys.stderr)
        self.start = time.perf_counter()
        self.tokens = 0

    def tokens_done(self, n: int) -> None:
        self.tokens += n
        self.bar.set_postfix_str(f"{self.rate():.1f} tok/s", refresh=False)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def request_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_lines(
    scheduler: Any,
    lines: list[InputLine],
    sampler: Sampler,
    out: OutputFile,
    *,
    in_flight_limit: int,
    progress: Progress,
    totals: Totals,
) -> None:
    """Keep `in_flight_limit` requests in the scheduler until every line has its row in `out`.

    The limit is twice the batch: the scheduler refills a finished row from its own queue at the
    very next step, where a line submitted only once the finish is seen here would miss that step.
    Each submitted request has a small thread that forwards its events to one queue, so the main
    thread wakes as soon as any request finishes; finished rows are written in groups of whatever
    finished together.
    """
    from rabbit_store.errors import RabbitError
    from rabbitllm.openai_requests import final_text

    events: queue.Queue[tuple[Job, Any]] = queue.Queue()
    pending = iter(lines)
    ids_by_number = {line.number: line.id for line in lines}
    in_flight: dict[str, Job] = {}

    def watch(job: Job) -> None:
        for event in job.handle:
            events.put((job, event))

    def fill() -> None:
        # tokenize first, then submit together: requests submitted in one go join the same pass
        jobs: list[Job] = []
        errors: list[LineError] = []
        while len(in_flight) + len(jobs) < in_flight_limit:
            line = next(pending, None)
            if line is None:
                break
            job = sampler.job(line) if line.error is None else line.error
            (jobs if isinstance(job, Job) else errors).append(job)  # type: ignore[arg-type]
        for job in jobs:
            line = job.line
            try:
                job.handle = scheduler.submit(job.prompt_ids, job.params, request_id=line.id)
            except RabbitError as exc:  # e.g. the prompt does not fit the context
                errors.append(LineError(line.number, f"line {line.number}: {exc}", None))
                continue
            in_flight[line.id] = job
            threading.Thread(
                target=watch, args=(job,), name=f"batch-{line.id}", daemon=True
            ).start()
        totals.failed.extend(errors)
        out.append([error.row(ids_by_number[error.line]) for error in errors])
        for _ in errors:
            progress.request_done()

    fill()
    while in_flight:
        ready = [events.get()]
        with contextlib.suppress(queue.Empty):
            while True:
                ready.append(events.get_nowait())
        rows: list[dict[str, Any]] = []
        failure: BaseException | None = None
        for job, event in ready:
            progress.tokens_done(len(event.token_ids))
            if event.finish_reason is None:
                continue
            del in_flight[job.line.id]
            if event.finish_reason in ("error", "cancelled"):
                # A failed step is the engine's failure, not this line's: stop once the rows that
                # did finish are written (a rerun resumes from them).
                failure = failure or event.error or RuntimeError(f"{job.line.id} was cancelled")
                continue
            ids = list(job.handle.output_ids)
            usage = {
                "prompt_tokens": len(job.prompt_ids),
                "completion_tokens": len(ids),
                "total_tokens": len(job.prompt_ids) + len(ids),
            }
            rows.append(
                {
                    "id": job.line.id,
                    "text": final_text(sampler.tokenizer, ids, job.params.stop_strings),
                    "finish_reason": event.finish_reason,
                    "usage": usage,
                }
            )
            totals.done += 1
            totals.completion_tokens += usage["completion_tokens"]
            progress.request_done()
        out.append(rows)
        if failure is not None:
            logger.warning("a batch step failed; the finished rows are saved, rerun to resume")
            raise failure
        fill()


def run(args: argparse.Namespace, console: Console) -> int:
    if args.ray is not None:
        return run_on_ray(args, console)
    in_path, out_path = Path(args.input), Path(args.output)
    if out_path.exists() and in_path.exists() and out_path.resolve() == in_path.resolve():
        raise UsageError(f"-o {out_path} is the input file; write the results to another file")
    if not out_path.parent.is_dir():
        raise UsageError(f"-o {out_path}: the directory {out_path.parent} does not exist")
    lines = read_input(in_path)
    if not lines:
        raise UsageError(f"{in_path} holds no requests (one JSON object per line)")
    runtime = runtime_options(args)
    spec = model_spec(args, progress=not console.quiet)
    with output_lock(out_path):
        out = OutputFile(out_path)
        out.open(line.id for line in lines)
        todo = [line for line in lines if line.id not in out.done]
        skipped = len(lines) - len(todo)
        if skipped:
            console.note(
                f"Resuming: {skipped} of {len(lines)} requests are already in {out_path}; "
                f"{len(todo)} to go."
            )
        totals = Totals()
        # lines that are not requests at all fail now, before the model loads (maybe for nothing)
        unreadable = [line for line in todo if line.error is not None]
        out.append([line.error.row(line.id) for line in unreadable if line.error])
        totals.failed.extend(line.error for line in unreadable if line.error)
        todo = [line for line in todo if line.error is None]
        try:
            if todo:
                _run_model(args, console, spec, runtime, todo, out, totals)
        finally:
            out.finish([line.id for line in lines])
    return _summary(console, totals, len(lines), skipped, out_path)


def _run_model(
    args: argparse.Namespace,
    console: Console,
    spec: Any,
    runtime: Any,
    todo: list[InputLine],
    out: OutputFile,
    totals: Totals,
) -> None:
    from rabbit_engine.batching.scheduler import BatchScheduler
    from rabbitllm.cli.loading import load_model, load_tokenizer, open_model
    from rabbitllm.openai_requests import eos_token_ids

    source = open_model(spec, trust_remote_code=runtime.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=runtime.trust_remote_code)
    model = load_model(spec, runtime)
    draft = scheduler_draft(args, model, tokenizer, spec, runtime)
    passes_before = _passes(model)
    start = time.perf_counter()
    progress = Progress(len(todo), disable=console.quiet)
    try:
        scheduler = BatchScheduler(
            model,
            max_batch=args.max_batch,
            max_queue=2 * args.max_batch,
            eos_token_ids=eos_token_ids(tokenizer, model.generation_config),
            tokenizer=tokenizer,
            draft=draft,
        )
        try:
            sampler = Sampler(args, tokenizer, model.generation_config, scheduler.max_context)
            run_lines(
                scheduler,
                todo,
                sampler,
                out,
                in_flight_limit=2 * args.max_batch,
                progress=progress,
                totals=totals,
            )
        finally:
            scheduler.close(cancel=True)
    finally:
        progress.close()
        totals.seconds = time.perf_counter() - start
        passes_after = _passes(model)
        if passes_before is not None and passes_after is not None:
            totals.passes = passes_after - passes_before
        model.close()


def _passes(model: Any) -> int | None:
    """The streamer's count of passes through the layers (None for a model without one)."""
    stats = getattr(model, "streamer_stats", None)
    return stats.get("passes") if isinstance(stats, dict) else None


def run_on_ray(args: argparse.Namespace, console: Console) -> int:
    """The same job on Ray Data (rabbitllm.ray): each actor loads the model and runs its blocks'
    rows through its own batch scheduler; the output equals a single-process run's."""
    if args.draft_model:
        raise UsageError("--draft-model does not run with --ray (--prompt-lookup does)")
    from rabbitllm.ray import options_from_cli, run_batch_job

    runtime_options(args)  # a bad flag fails here, before a cluster starts
    spec = model_spec(args, progress=not console.quiet)
    result = run_batch_job(
        args.input,
        args.output,
        address=args.ray,
        concurrency=args.ray_workers,
        num_cpus_per_worker=args.ray_cpus_per_worker,
        progress=not console.quiet,
        **options_from_cli(args, spec),
    )
    rate = result.completion_tokens / result.seconds if result.seconds > 0 else 0.0
    console.note(
        f"[{result.rows - result.failed} requests, {result.completion_tokens} tokens in "
        f"{result.seconds:.1f} s, {rate:.2f} tokens/s on {args.ray_workers} Ray worker(s); "
        f"results in {result.output}]"
    )
    if not result.failed:
        return 0
    console.error(
        f"{result.failed} of {result.rows} input rows could not run; their rows in "
        f"{result.output} carry the error; first: {result.first_error}"
    )
    return EXIT_USAGE


def _summary(console: Console, totals: Totals, total: int, skipped: int, out_path: Path) -> int:
    rate = totals.completion_tokens / totals.seconds if totals.seconds > 0 else 0.0
    per_pass = ""
    if totals.passes and totals.completion_tokens:
        per_pass = f", {totals.completion_tokens / totals.passes:.2f} tokens per streamed pass"
    console.note(
        f"[{totals.done} requests, {totals.completion_tokens} tokens in {totals.seconds:.1f} s, "
        f"{rate:.2f} tokens/s{per_pass}; {skipped} done before; results in {out_path}]"
    )
    if not totals.failed:
        return 0
    failed = sorted(totals.failed, key=lambda e: e.line)
    numbers = ", ".join(str(e.line) for e in failed[:10])
    more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
    console.error(
        f"{len(failed)} of {total} input lines could not run (lines {numbers}{more}); "
        f"their rows in {out_path} carry the error; first: {failed[0].message}"
    )
    return EXIT_USAGE
