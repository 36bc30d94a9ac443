"""The callable class that Ray Data's actors run: rows of requests in, rows of results out.

Each actor constructs it once: the model (streamed, with the usual `from_pretrained` options), its
tokenizer and one `BatchScheduler`. A call submits every row of its batch to that scheduler before
waiting for any, so the rows share each streamed pass through the weights (a pass costs about the
same for one sequence as for sixteen). Rows are read exactly as `rabbit batch` reads its lines
(`rabbitllm.request_lines`: `parse_line`, `Sampler`), so the same row gets the
same checks, the same defaults and, greedy, the same text.

A row that cannot run (no prompt, a field of the wrong type, a prompt longer than the context)
becomes an error row naming the row and the field; it is never dropped. A failure of the engine
itself (a failed pass) raises, so Ray Data fails or retries the task rather than writing rows that
are not results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

logger = logging.getLogger(__name__)

#: The columns every call returns, one row per input row, in input order. A row that ran has
#: `text`, `finish_reason` and the token counts; a row that could not run has `error` (the message
#: names the row and the field) and `error_param` (the field, when one is at fault). `line` is the
#: row's number in the job's input (`run_batch_job` sets it), null when the dataset has none.
OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("line", pa.int64()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("error", pa.string()),
        ("error_param", pa.string()),
    ]
)

#: Columns that say which row this is rather than what to generate.
ROW_NUMBER_COLUMN = "line"
#: A column holding a whole request as one JSON text (a line of a `rabbit batch` input file). Rows
#: whose fields differ in type from row to row (a prompt that is text here and token ids there)
#: cannot share an Arrow column, so the job ships each line as text and parses it here.
REQUEST_COLUMN = "request"


class RabbitLLMPredictor:
    """`ds.map_batches(RabbitLLMPredictor, fn_constructor_kwargs={...}, concurrency=N)`.

    Input rows: OpenAI completion fields (`prompt`: text or token ids) or chat fields (`messages`),
    with any per-row settings `rabbit batch` accepts (`max_tokens`, `temperature`, `top_p`, `seed`,
    `stop`...), an optional `id`, optional `line` (the row's number, for messages and default ids),
    or a `request` column holding the whole request as JSON text. Null values count as absent
    (Arrow fills the columns a row does not have with nulls). Output rows: `OUTPUT_SCHEMA`.

    Constructor: `model` is a local directory, hub id or fsspec URL (`None`: the default model,
    built on each worker); `storage_options`, `token`, `revision`, `layers_path`, `local_cache`,
    `trust_remote_code` and the streaming options (`device`, `dtype`, `max_memory`, `compression`,
    ..., or a built `options=StreamingOptions`) are `AutoModel.from_pretrained`'s. `tokenizer`: a
    location to read the tokenizer from instead of the model's (a checkpoint that ships none, with
    the same vocabulary). `max_batch` is the sequences sharing a pass; the
    sampling keywords are defaults for what a row leaves out, as `rabbit batch`'s flags are.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        token: str | None = None,
        revision: str | None = None,
        storage_options: dict[str, Any] | None = None,
        layers_path: str | None = None,
        trust_remote_code: bool = False,
        local_cache: bool | str = False,
        tokenizer: str | None = None,
        max_batch: int = 16,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop_on_repetition: bool = True,
        prompt_lookup: int = 0,
        **streaming_options: Any,
    ) -> None:
        import torch

        from rabbit_engine.batching.scheduler import BatchScheduler
        from rabbit_store import open_source
        from rabbitllm import AutoModel
        from rabbitllm.cli.loading import load_tokenizer
        from rabbitllm.openai_requests import eos_token_ids
        from rabbitllm.request_lines import Sampler, SamplingDefaults

        started = time.perf_counter()
        # Ray Data may run two calls at once on one actor (run_batch_job does, so that the next
        # block's rows fill the passes while the last rows of the previous one finish); the
        # scheduler is thread-safe, a fast tokenizer used from two threads at once is not
        self._text_lock = threading.Lock()
        if model is None:
            from rabbitllm.default_model import default_model_path

            model = str(default_model_path(progress=False))
        location = dict(
            revision=revision, token=token, storage_options=storage_options, local_cache=local_cache
        )
        self.tokenizer = load_tokenizer(
            open_source(tokenizer or model, **location), trust_remote_code=trust_remote_code
        )
        self.model = AutoModel.from_pretrained(
            model,
            **location,
            layers_path=layers_path,
            trust_remote_code=trust_remote_code,
            **streaming_options,
        )
        self.scheduler = BatchScheduler(
            self.model,
            max_batch=max_batch,
            max_queue=4 * max_batch,
            eos_token_ids=eos_token_ids(self.tokenizer, self.model.generation_config),
            tokenizer=self.tokenizer,
        )
        defaults = SamplingDefaults(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            prompt_lookup=prompt_lookup,
            stop_on_repetition=stop_on_repetition,
        )
        self.sampler = Sampler(
            defaults, self.tokenizer, self.model.generation_config, self.scheduler.max_context
        )
        logger.info(
            "%s loaded in %.1f s (%d torch threads)",
            model,
            time.perf_counter() - started,
            torch.get_num_threads(),
        )

    def __call__(self, batch: Any) -> pa.Table:
        """One output row per input row, in order; every runnable row in the same scheduler."""
        from rabbit_store.errors import RabbitError
        from rabbitllm.openai_requests import final_text
        from rabbitllm.request_lines import Job, LineError

        # every row is checked and tokenized first, then all are submitted in one go: rows that
        # reach the scheduler together join the same pass
        lines = [input_line(row) for row in batch_rows(batch)]
        with self._text_lock:
            items = [line.error or self.sampler.job(line) for _, line in lines]
        results: list[dict[str, Any]] = [{} for _ in lines]
        running: list[tuple[int, Job, Any]] = []
        for index, ((number, line), item) in enumerate(zip(lines, items, strict=True)):
            if isinstance(item, Job):
                try:
                    running.append((index, item, self._submit(item)))
                    continue
                except RabbitError as exc:  # e.g. the prompt does not fit the context
                    item = LineError(line.number, f"line {line.number}: {exc}", None)
            results[index] = error_row(line.id, number, item)
        for index, job, handle in running:
            ids = handle.result()  # raises the engine's error if a pass failed
            if handle.finish_reason == "cancelled":
                raise RuntimeError(f"request {job.line.id} was cancelled (the scheduler closed)")
            with self._text_lock:
                text = final_text(self.tokenizer, ids, job.params.stop_strings)
            results[index] = {
                "id": job.line.id,
                "line": job.line.number or None,
                "text": text,
                "finish_reason": handle.finish_reason,
                "prompt_tokens": len(job.prompt_ids),
                "completion_tokens": len(ids),
            }
        return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)

    def _submit(self, job: Any) -> Any:
        """Submit, waiting while the scheduler's queue is full (a batch larger than the queue)."""
        from rabbit_engine.errors import QueueFullError

        while True:
            try:
                return self.scheduler.submit(job.prompt_ids, job.params, request_id=job.line.id)
            except QueueFullError:
                time.sleep(0.01)

    def close(self) -> None:
        """Stop the scheduler's thread and release the model's files."""
        self.scheduler.close(cancel=True)
        self.model.close()


# ---- rows ----------------------------------------------------------------------------------------


def batch_rows(batch: Any) -> list[dict[str, Any]]:
    """A Ray Data batch (pyarrow Table, pandas DataFrame or dict of numpy arrays) as plain Python
    rows, so that a row checks the same whatever format the caller chose."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return [{k: plain(v) for k, v in row.items()} for row in batch.to_dict("records")]
    if isinstance(batch, Mapping):
        columns = {name: list(values) for name, values in batch.items()}
        count = len(next(iter(columns.values()), []))
        return [{name: plain(values[i]) for name, values in columns.items()} for i in range(count)]
    raise TypeError(
        f"RabbitLLMPredictor: a batch must be a pyarrow Table, a pandas DataFrame or a dict of "
        f"arrays, got {type(batch).__name__}"
    )


def plain(value: Any) -> Any:
    """numpy values as Python ones; pandas' missing values (NaN, None, NA) as None."""
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy array or scalar
        return plain_nested(value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return None  # pandas writes a missing number as NaN; a row cannot have meant NaN
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return plain_nested(value)


def plain_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return plain_nested(value.tolist())
    return value


def input_line(row: dict[str, Any]) -> tuple[int | None, Any]:
    """The row as `rabbit batch`'s InputLine (its number, id, body and kind, or its error)."""
    from rabbitllm.request_lines import InputLine, LineError, parse_line

    number = row.get(ROW_NUMBER_COLUMN)
    if number is not None and (not isinstance(number, int) or number < 1):
        number = None
    request = row.get(REQUEST_COLUMN)
    if isinstance(request, bytes | str):
        text = request.encode() if isinstance(request, str) else request
    else:
        body = {
            k: v
            for k, v in row.items()
            if v is not None and k not in (ROW_NUMBER_COLUMN, REQUEST_COLUMN)
        }
        try:
            text = json.dumps(body, allow_nan=True).encode()
        except (TypeError, ValueError) as exc:
            bad = next((k for k, v in body.items() if not _json_ready(v)), None)
            error = LineError(
                number or 0, f"line {number or 0}: {bad}: not a JSON value ({exc})", bad
            )
            return number, InputLine(number or 0, _own_id(row, number), error=error)
    line = parse_line(number or 0, text)
    if number is None:  # no default id ("line-0" would name nothing)
        line = dataclasses.replace(line, id=_own_id(row, None))
    return number, line


def _json_ready(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _own_id(row: dict[str, Any], number: int | None) -> str | None:
    value = row.get("id", row.get("custom_id"))
    if isinstance(value, str) and value:
        return value
    return f"line-{number}" if number else None


def error_row(request_id: str | None, number: int | None, error: Any) -> dict[str, Any]:
    """The output row of a row that cannot run. Without a row number (a dataset with no `line`
    column) the message names the row by its id instead of "line 0"."""
    message = error.message
    if number is None:
        label = f"row {request_id!r}" if request_id else "a row without an id"
        message = label + message.removeprefix("line 0")
    return {"id": request_id, "line": number, "error": message, "error_param": error.param}
