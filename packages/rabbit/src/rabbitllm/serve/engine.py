"""The one model a server process serves: the streamed model, its tokenizer, and the scheduler that
batches every request onto it.

The scheduler runs in its own thread and speaks through `RequestHandle.events` (a blocking
`queue.Queue`). The event loop must never block on it, so each wait runs in a thread of a pool
sized for every request the scheduler can hold at once (active plus queued): a wait costs an idle
thread, and no request waits for another's wait to time out. Waits are short (`POLL_SECONDS`) so
that the caller can look at its client between them and cancel a request whose client left.

Tokenizing a request (a chat template, a prompt of up to --max-request-bytes) runs in one more
thread, off the event loop, one request at a time: a fast tokenizer shared by threads that encode
at once can fail ("Already borrowed"), and one thread is plenty for what the model can generate.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rabbit_engine.batching.requests import RequestHandle, TokenEvent
from rabbitllm.openai_requests import eos_token_ids

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.25

T = TypeVar("T")


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    scheduler: Any  # rabbit_engine.batching.scheduler.BatchScheduler
    name: str
    executor: ThreadPoolExecutor = field(repr=False)
    tokenizing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="rabbit-serve-tokenize"),
        repr=False,
    )
    _closed: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def start(
        cls,
        model: Any,
        tokenizer: Any,
        name: str,
        *,
        max_batch: int,
        max_queue: int,
        draft: Any = None,
    ) -> Engine:
        from rabbit_engine.batching.scheduler import BatchScheduler

        eos = eos_token_ids(tokenizer, model.generation_config)
        scheduler = BatchScheduler(
            model,
            max_batch=max_batch,
            max_queue=max_queue,
            eos_token_ids=eos,
            tokenizer=tokenizer,
            draft=draft,
        )
        executor = ThreadPoolExecutor(
            max_workers=max_batch + max_queue + 4, thread_name_prefix="rabbit-serve-wait"
        )
        return cls(model, tokenizer, scheduler, name, executor)

    @property
    def generation_config(self) -> Any:
        return self.model.generation_config

    @property
    def max_context(self) -> int | None:
        return self.scheduler.max_context

    @property
    def closing(self) -> bool:
        return self._closed.is_set()

    async def tokenize(self, work: Callable[[], T]) -> T:
        """Run `work` (which uses the tokenizer) in the tokenizer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, work)

    async def next_event(self, handle: RequestHandle) -> TokenEvent | None:
        """The request's next event, or None when none came within `POLL_SECONDS`."""

        def get() -> TokenEvent | None:
            try:
                return handle.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                return None

        return await asyncio.get_running_loop().run_in_executor(self.executor, get)

    def drain(self, timeout: float) -> None:
        """Stop taking requests, give in-flight ones `timeout` s to finish, cancel the rest."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.scheduler.close(cancel=False, timeout=timeout)
        self.scheduler.close(cancel=True, timeout=30)

    def close(self) -> None:
        """Cancel whatever still runs and free the model; safe to call twice."""
        self._closed.set()
        self.scheduler.close(cancel=True, timeout=30)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.tokenizing.shutdown(wait=False, cancel_futures=True)
        self.model.close()
