"""Continuous batching: one streamed pass computes a step for every active sequence.

A streamed decode step is bound by reading the layers, so a pass that computes 16 sequences costs
about what one costs. The scheduler thread owns the model: each step it admits waiting requests
(their whole prompt fed in the same pass as the others' next token, or in a pass of their own when
the padding would cost more: `cost.py`), runs one forward, picks each row's tokens, and lets
finished or cancelled requests leave. Requests talk to it only through
`RequestHandle`s, so a server's event loop never blocks on the model.

Families whose cache cannot hold holes (sliding windows, recurrent states; see `rows.py`) run one
request at a time, still through this scheduler, with transformers' own `generate` (which knows
every family's cache; prompt lookup through it too, the draft model not).
"""

from __future__ import annotations

import collections
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rabbit_engine.batching.cost import StepCost
from rabbit_engine.batching.draft import DraftModel
from rabbit_engine.batching.lookup import propose
from rabbit_engine.batching.repetition import repeating_tail, window
from rabbit_engine.batching.requests import FinishReason, RequestHandle, SamplingParams
from rabbit_engine.batching.rows import BatchRows
from rabbit_engine.batching.sampling import TokenPicker
from rabbit_engine.errors import InvalidOptionError, QueueFullError, SchedulerClosedError

logger = logging.getLogger(__name__)

#: prompt ids, settings, and an optional request id (the caller's name for it in logs)
Request = tuple[list[int], SamplingParams, str | None]


@dataclass
class _Sequence:
    handle: RequestHandle
    picker: TokenPicker
    ids: list[int]  # prompt + generated, real tokens only
    feed: list[int]  # what the next forward consumes (the prompt, then the last picked token)
    cached: int = 0  # real tokens already in the cache = the next position
    draft: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Unique among live requests even when callers reuse request ids."""
        return str(id(self.handle))


class BatchScheduler:
    """Serves `submit`ted requests on `model` from a background thread until `close()`.

    `separate_prefill`: True feeds joining prompts in a pass of their own, False always in the
    shared pass; None (default) decides each time from the measured step costs (`cost.py`).
    `draft`: a resident `DraftModel` whose proposals greedy requests verify in the shared pass.
    """

    def __init__(
        self,
        model,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        tokenizer=None,
        pad_token_id: int | None = None,
        draft: DraftModel | None = None,
        separate_prefill: bool | None = None,
    ) -> None:
        if max_batch < 1:
            raise InvalidOptionError(f"max_batch={max_batch!r}: must be at least 1")
        if max_queue < 0:
            raise InvalidOptionError(f"max_queue={max_queue!r}: must be 0 or more")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pad_token_id = (
            pad_token_id if pad_token_id is not None else min(self.eos_token_ids, default=0)
        )
        self.device = model.device
        text_config = model.config.get_text_config()
        self.max_context: int | None = getattr(text_config, "max_position_embeddings", None)
        self.rows = BatchRows(model.config, self.device)
        self.cost = StepCost()
        self.separate_prefill = separate_prefill  # None: decided per step from `cost`
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns)
        forward_args = inspect.signature(type(model).forward).parameters
        self._cache_argument = "cache" if "cache" in forward_args else "past_key_values"
        self.batchable = self.rows.cache is not None
        if not self.batchable and max_batch > 1:
            logger.warning(
                "%s's cache cannot be shared by a batch (sliding window or recurrent layers): "
                "requests run one at a time",
                text_config.model_type,
            )
        self.max_batch = max_batch if self.batchable else 1
        self.max_queue = max_queue
        self.draft = draft if self.batchable else None
        if draft is not None and not self.batchable:
            logger.warning("the draft model is not used: this family runs one request at a time")
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._active: list[_Sequence] = []
        self._lock = threading.Condition()
        self._closing = False
        self._cancel_on_close = True
        self._ids = itertools.count()
        self._passes = 0
        self._generated = 0
        self._separate_prefills = 0  # joiners prefilled in a pass of their own
        self._thread = threading.Thread(target=self._run, name="rabbit-batch", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestHandle:
        return self.submit_many([(prompt_ids, params, request_id)])[0]

    def submit_many(
        self, requests: Sequence[tuple[list[int], SamplingParams] | Request]
    ) -> list[RequestHandle]:
        """Queue all of `requests` at once (or none: QueueFullError), so they join the same step
        instead of trickling in while the scheduler thread is already stepping."""
        handles = [self._handle(*request) for request in requests]
        with self._lock:
            if self._closing:
                raise SchedulerClosedError("the scheduler is shutting down")
            if len(handles) > self._room():
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting "
                    f"(max_queue={self.max_queue})"
                )
            self._waiting.extend(handles)
            self._lock.notify_all()
        return handles

    def _room(self) -> int:
        """Requests that can be queued now: free batch slots plus free queue places."""
        free_slots = max(0, self.max_batch - len(self._active))
        return self.max_queue + free_slots - len(self._waiting)

    def _handle(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestHandle:
        if not prompt_ids:
            raise InvalidOptionError("prompt: empty (at least one token is needed)")
        total = len(prompt_ids) + params.max_new_tokens
        if self.max_context is not None and len(prompt_ids) >= self.max_context:
            raise InvalidOptionError(
                f"prompt: {len(prompt_ids)} tokens, the model's context is {self.max_context}"
            )
        if self.max_context is not None and total > self.max_context:
            raise InvalidOptionError(
                f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({params.max_new_tokens}) "
                f"= {total} tokens, more than the model's context of {self.max_context}"
            )
        return RequestHandle(request_id or f"req-{next(self._ids)}", list(prompt_ids), params)

    def generate(self, requests: Sequence[tuple[list[int], SamplingParams]]) -> list[RequestHandle]:
        """Submit all (as many at once as there is room for) and wait for every one."""
        handles: list[RequestHandle] = []
        pending = list(requests)
        while pending:
            with self._lock:
                take = min(len(pending), self._room())
                if take <= 0:
                    self._lock.wait(0.05)
                    continue
            try:
                handles += self.submit_many(pending[:take])
            except QueueFullError:  # another caller took the room meanwhile
                continue
            pending = pending[take:]
        for handle in handles:
            handle.wait()
        return handles

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "passes": self._passes,
                "generated_tokens": self._generated,
                "separate_prefills": self._separate_prefills,
                "active": len(self._active),
                "queued": len(self._waiting),
            }

    def close(self, cancel: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; cancel the rest (or let in-flight and queued ones finish)."""
        with self._lock:
            self._closing = True
            self._cancel_on_close = cancel
            self._lock.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> BatchScheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- scheduler thread --------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closing and not self._waiting and not self._active:
                        self._lock.wait()
                    if self._closing and self._cancel_on_close:
                        for handle in self._waiting:
                            handle._emit([], "cancelled")
                        self._waiting.clear()
                        for seq in self._active:
                            seq.handle._emit([], "cancelled")
                        self._active.clear()
                        return
                    if self._closing and not self._waiting and not self._active:
                        return
                    self._admit()
                self._drop_cancelled()
                if not self._active:
                    continue
                try:
                    if self.batchable:
                        self._step()
                    else:
                        self._generate_alone(self._active[0])
                        self._leave([])
                except Exception as exc:  # fail this batch's requests, keep serving new ones
                    logger.exception("batch step failed; failing %d requests", len(self._active))
                    with self._lock:
                        for seq in self._active:
                            seq.handle._fail(exc)
                        self._active.clear()
                    self.rows.reset()
                    if self.draft is not None:
                        self.draft = DraftModel(self.draft.model, tokens=self.draft.tokens)

    def _admit(self) -> None:
        new = []
        while self._waiting and len(self._active) + len(new) < self.max_batch:
            handle = self._waiting.popleft()
            if handle.cancelled:
                handle._emit([], "cancelled")
                continue
            seq = _Sequence(
                handle, TokenPicker(handle.params), list(handle.prompt_ids), list(handle.prompt_ids)
            )
            new.append(seq)
        if new:
            self._active.extend(new)  # rows in the cache come at their first forward
            self._lock.notify_all()  # room in the queue for `generate` callers

    def _drop_cancelled(self) -> None:
        keep = [i for i, seq in enumerate(self._active) if not seq.handle.cancelled]
        if len(keep) == len(self._active):
            return
        for seq in self._active:
            if seq.handle.cancelled:
                seq.handle._emit([], "cancelled")
        self._leave(keep)

    def _leave(self, keep: list[int]) -> None:
        if self.draft is not None:
            kept = set(keep)
            for i, seq in enumerate(self._active):
                if i not in kept:
                    self.draft.forget(seq.key)
        with self._lock:
            self._active = [self._active[i] for i in keep]
            self._lock.notify_all()
        if self.batchable:
            self.rows.keep_rows([i for i in keep if i < self.rows.size])

    def _propose(self, seq: _Sequence) -> list[int]:
        """Speculative tokens for a greedy row: prompt lookup if the request asks for it, else the
        draft model's if the scheduler has one (sampled rows get none: verification here is
        greedy)."""
        params = seq.handle.params
        if not params.greedy or not (params.prompt_lookup or self.draft is not None):
            return []
        count = params.max_new_tokens - len(seq.handle.output_ids) - 1
        if self.max_context is not None:
            count = min(count, self.max_context - len(seq.ids) - 1)
        if params.prompt_lookup:
            count = min(count, params.prompt_lookup)
            return propose(seq.ids, count) if count > 0 else []
        count = min(count, self.draft.tokens)
        return self.draft.propose(seq.key, seq.ids, count) if count > 0 else []

    def _step(self) -> None:
        """One scheduler step: every active row gets its next token(s).

        The first `rows.size` active sequences have rows in the cache; the rest joined since the
        last step. Joiners are fed in the same pass unless the padding that costs is worth more
        than a pass of their own (`cost.py`).
        """
        active = self._active
        for seq in active:
            seq.draft = self._propose(seq)
        running = self.rows.size
        joining = active[running:]
        if joining and running and self._separate_prefill_pays(active, running):
            with self._lock:
                self._separate_prefills += 1
            fresh = BatchRows(self.model.config, self.device)
            fresh.add_rows(len(joining))
            done_new = self._forward(joining, fresh)
            done_old = self._forward(active[:running], self.rows)
            self.rows.merge(fresh)
            finished = set(done_old) | {running + i for i in done_new}
        else:
            self.rows.add_rows(len(joining))
            finished = set(self._forward(active, self.rows))
        if finished:
            self._leave([i for i in range(len(active)) if i not in finished])
        else:
            self.rows.drop_empty_columns()

    def _separate_prefill_pays(self, active: list[_Sequence], running: int) -> bool:
        lengths = [len(seq.feed) + len(seq.draft) for seq in active]

        def padding(group: list[int]) -> int:
            return max(group) * len(group) - sum(group) if group else 0

        if self.separate_prefill is not None:
            return self.separate_prefill
        saved = padding(lengths) - padding(lengths[:running]) - padding(lengths[running:])
        return self.cost.separate_pass_pays(saved)

    def _forward(self, seqs: list[_Sequence], rows: BatchRows) -> list[int]:
        """One streamed pass over `seqs` (whose cache rows are `rows`, in order); returns the
        indices of those that finished."""
        feeds = [seq.feed + seq.draft for seq in seqs]
        width = max(len(f) for f in feeds)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        step_mask = torch.zeros(len(seqs), width, dtype=torch.long)
        positions = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, (seq, feed) in enumerate(zip(seqs, feeds, strict=True)):
            start = width - len(feed)
            input_ids[r, start:] = torch.tensor(feed)
            step_mask[r, start:] = 1
            positions[r, start:] = torch.arange(seq.cached, seq.cached + len(feed))
            positions[r, :start] = seq.cached  # any valid position: these slots are holes
        keep_logits = max(len(seq.draft) + 1 for seq in seqs)
        started = time.perf_counter()
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=rows.extend(step_mask.to(self.device)),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=keep_logits,
            **{self._cache_argument: rows.cache},
        )
        logits = out.logits[:, -keep_logits:, :].float().cpu()
        self.cost.observe(input_ids.numel(), time.perf_counter() - started)
        with self._lock:
            self._passes += 1
        finished = []
        for r, seq in enumerate(seqs):
            seq.handle.passes += 1
            accepted = self._accept(r, seq, logits[r], rows)
            finish = self._finish_reason(seq, accepted)
            self._generated_add(len(accepted))
            seq.handle._emit(accepted, finish)
            if finish is not None:
                finished.append(r)
        return finished

    def _generated_add(self, count: int) -> None:
        with self._lock:
            self._generated += count

    def _accept(self, r: int, seq: _Sequence, logits: torch.Tensor, rows: BatchRows) -> list[int]:
        """The tokens this step gives `seq`: one picked token, or the verified draft prefix plus
        the model's own next token. Rejected draft slots become holes in the cache."""
        fed = len(seq.feed) + len(seq.draft)
        seq.cached += fed
        if not seq.draft:
            token = seq.picker.pick(seq.ids, logits[-1])
            accepted = [token]
        else:
            k = len(seq.draft)
            picks = seq.picker.greedy_all(seq.ids, logits[-(k + 1) :])
            n = 0
            while n < k and picks[n] == seq.draft[n]:
                n += 1
            accepted = seq.draft[:n] + [picks[n]]
            rejected = k - n
            if rejected:
                seq.cached -= rejected
                rows.hide(r, slice(rows.columns - rejected, rows.columns))
        accepted = self._truncate_at_stop(seq, accepted)
        seq.ids.extend(accepted)
        seq.feed = [accepted[-1]]
        return accepted

    def _truncate_at_stop(self, seq: _Sequence, accepted: list[int]) -> list[int]:
        """Cut a multi-token acceptance after an end token or at the length limit."""
        params = seq.handle.params
        room = params.max_new_tokens - len(seq.handle.output_ids)
        accepted = accepted[:room]
        stops = self.eos_token_ids | params.stop_token_ids
        for i, token in enumerate(accepted):
            if token in stops:
                return accepted[: i + 1]
        return accepted

    def _finish_reason(self, seq: _Sequence, accepted: list[int]) -> FinishReason | None:
        params = seq.handle.params
        generated = len(seq.handle.output_ids) + len(accepted)
        if accepted and accepted[-1] in (self.eos_token_ids | params.stop_token_ids):
            return "stop"
        if (
            params.stop_strings
            and self.tokenizer is not None
            and self._hit_stop_string(seq, generated)
        ):
            return "stop"
        if generated >= params.max_new_tokens:
            return "length"
        if self.max_context is not None and len(seq.ids) >= self.max_context:
            return "length"
        if params.stop_on_repetition and repeating_tail(self._generated_tail(seq)):
            logger.info("request %s stopped: its output repeats itself", seq.handle.request_id)
            return "stop"
        return None

    @staticmethod
    def _generated_tail(seq: _Sequence) -> list[int]:
        """The generated ids the repetition check can see (not the prompt, not the whole run)."""
        return seq.ids[max(len(seq.handle.prompt_ids), len(seq.ids) - window()) :]

    def _hit_stop_string(self, seq: _Sequence, generated: int) -> bool:
        longest = max(len(s) for s in seq.handle.params.stop_strings)
        window = seq.ids[len(seq.ids) - min(generated, longest + 8) :]
        text = self.tokenizer.decode(window, skip_special_tokens=True)
        return any(s in text for s in seq.handle.params.stop_strings)

    def _generate_alone(self, seq: _Sequence) -> None:
        """A family whose cache cannot be batched: transformers' own `generate` runs the request
        (it knows every family's cache), streaming tokens to the handle as they come."""
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        scheduler, handle, params = self, seq.handle, seq.handle.params
        prompt_len = len(seq.ids)

        class Emit(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                tokens = value.reshape(-1).tolist()
                seq.ids.extend(tokens)
                scheduler._generated_add(len(tokens))
                handle._emit(tokens, None)

            def end(self) -> None:
                pass

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
                stop = handle.cancelled or (
                    params.stop_on_repetition and repeating_tail(scheduler._generated_tail(seq))
                )
                if not stop and params.stop_strings and scheduler.tokenizer is not None:
                    stop = scheduler._hit_stop_string(seq, len(seq.ids) - prompt_len)
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)

        kwargs = {"do_sample": False}
        if not params.greedy:
            kwargs = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            kwargs["top_k"] = params.top_k or None
            if params.seed is not None:
                torch.manual_seed(params.seed)
        elif params.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = params.prompt_lookup
        stops = sorted(self.eos_token_ids | params.stop_token_ids)
        before = getattr(self.model, "streamer_stats", {}).get("passes")
        self.model.generate(
            torch.tensor([seq.ids], device=self.device),
            attention_mask=torch.ones(1, prompt_len, dtype=torch.long, device=self.device),
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=stops or None,
            pad_token_id=self.pad_token_id,
            streamer=Emit(),
            stopping_criteria=StoppingCriteriaList([Halt()]),
            **kwargs,
        )
        after = getattr(self.model, "streamer_stats", {}).get("passes")
        passes = after - before if before is not None and after is not None else 0
        handle.passes += passes
        with self._lock:
            self._passes += passes
        generated = seq.ids[prompt_len:]
        if handle.cancelled:
            reason: FinishReason = "cancelled"
        elif generated and generated[-1] in stops:
            reason = "stop"
        elif len(generated) >= params.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        handle._emit([], reason)
