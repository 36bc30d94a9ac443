"""What a caller hands the batch scheduler and what it gets back.

Token ids in, token ids out: text (chat templates, detokenization, the text cut at a stop string) is
the caller's business, so the engine needs no tokenizer except to see stop strings as they appear.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Literal

from rabbit_engine.errors import InvalidOptionError

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """One request's settings. temperature 0 means greedy.

    `stop_on_repetition` ends a sequence whose tail has become a loop (see `repetition.py`): small
    models sampled or greedy fall into them, and a user would rather have the answer than 500
    tokens of the same line. `prompt_lookup` > 0 lets the scheduler propose that many tokens from
    the request's own context each step (greedy requests only), verified in the same pass.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    stop_on_repetition: bool = True
    prompt_lookup: int = 0

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
            "prompt_lookup": self.prompt_lookup >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidOptionError(f"{name}={getattr(self, name)!r} is out of range")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenEvent:
    """Tokens a step produced for one request (several when speculative tokens were accepted);
    the last event of a request carries its `finish_reason`."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: BaseException | None = None


@dataclass
class RequestHandle:
    """The caller's side of one request: iterate it (blocking) or poll `events` from async code.

    `cancel()` is safe from any thread; the scheduler drops the sequence at its next step, so a
    client that goes away stops costing compute within one pass.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    events: queue.Queue[TokenEvent] = field(default_factory=queue.Queue, repr=False)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    passes: int = 0  # streamed passes this request took part in
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished; True if it finished within `timeout`."""
        return self._done.wait(timeout)

    def __iter__(self):
        """Yield each `TokenEvent` until the final one (inclusive)."""
        while True:
            event = self.events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> list[int]:
        """The generated ids once finished; raises the scheduler's error if the step failed."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        return list(self.output_ids)

    _error: BaseException | None = field(default=None, repr=False)

    # ---- scheduler side ----------------------------------------------------------------------
    def _emit(self, token_ids: list[int], finish_reason: FinishReason | None) -> None:
        self.output_ids.extend(token_ids)
        if finish_reason is not None:
            self.finish_reason = finish_reason
        self.events.put(TokenEvent(list(token_ids), finish_reason))
        if finish_reason is not None:
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self.finish_reason = "error"
        self.events.put(TokenEvent([], "error", error))
        self._done.set()
