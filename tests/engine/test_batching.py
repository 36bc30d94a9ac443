"""Continuous batching on a streamed model; the oracle is transformers' own `generate` on the
reference model, one prompt at a time."""

from __future__ import annotations

import threading

import pytest
import torch

from rabbit_engine.batching import BatchScheduler, SamplingParams
from rabbit_engine.batching.cost import StepCost
from rabbit_engine.batching.draft import DraftModel
from rabbit_engine.errors import InvalidOptionError, QueueFullError, SchedulerClosedError
from rabbitllm import AutoModel
from tests.models.families import EOS_ID, build_model, save_checkpoint

PROMPTS = [
    [1, 17, 42, 99, 3],
    [1, 200, 5],
    [1, 8, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    [1, 77],
    [1, 120, 121, 122, 123, 124],
    [1, 33, 34],
    [1, 250, 249, 248, 247],
    [1, 60, 61, 62, 63, 64, 65],
]
NEW = 12


def greedy(n: int = NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, stop_on_repetition=False, **kw)


def reference_tokens(ref, prompt: list[int], n: int = NEW) -> list[int]:
    out = ref.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=EOS_ID,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def streamed(llama_checkpoint):
    ref, path = llama_checkpoint
    with AutoModel.from_pretrained(path) as model:
        yield ref, model


def scheduler(model, **kw) -> BatchScheduler:
    return BatchScheduler(model, eos_token_ids={EOS_ID}, **kw)


def test_eight_at_once_give_each_prompts_own_greedy_tokens_in_one_pass_per_step(streamed):
    ref, model = streamed
    expected = [reference_tokens(ref, p) for p in PROMPTS]
    with scheduler(model, max_batch=8) as sched:
        alone = sched.generate([(PROMPTS[0], greedy())])[0]
        passes_before = model.streamer_stats["passes"]
        handles = sched.generate([(p, greedy()) for p in PROMPTS])
        passes = model.streamer_stats["passes"] - passes_before
    assert alone.output_ids == expected[0]
    assert [h.output_ids for h in handles] == expected
    assert [h.finish_reason for h in handles] == [
        "stop" if e[-1] == EOS_ID else "length" for e in expected
    ]
    # Admitted together (submit_many): one pass per step for all eight, not 8 x NEW.
    assert passes == max(len(e) for e in expected)
    assert sched.stats["generated_tokens"] == sum(len(e) for e in expected) + len(expected[0])


def test_requests_join_and_leave_mid_flight(streamed):
    ref, model = streamed
    lengths = [4, 20, 9, 15, 6, 12, 3, 18]
    expected = [reference_tokens(ref, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    with scheduler(model, max_batch=4) as sched:
        first = [sched.submit(p, greedy(n)) for p, n in zip(PROMPTS[:4], lengths[:4], strict=True)]
        # the rest arrive once the first ones have produced a few tokens
        next(iter(first[1]))
        rest = [sched.submit(p, greedy(n)) for p, n in zip(PROMPTS[4:], lengths[4:], strict=True)]
        for h in first + rest:
            assert h.wait(120)
    assert [h.output_ids for h in first + rest] == expected
    assert sched.stats["active"] == 0


@pytest.mark.parametrize("separate", [False, True], ids=["same-pass", "own-pass"])
def test_joiners_prefill_in_the_shared_pass_or_their_own(streamed, separate):
    ref, model = streamed
    long_prompt = list(range(2, 60))
    expected = [reference_tokens(ref, p, 16) for p in (PROMPTS[0], long_prompt, PROMPTS[1])]
    with scheduler(model, separate_prefill=separate) as sched:
        first = sched.submit(PROMPTS[0], greedy(16))
        next(iter(first))
        joiners = [sched.submit(long_prompt, greedy(16)), sched.submit(PROMPTS[1], greedy(16))]
        for h in [first, *joiners]:
            assert h.wait(120)
    assert [h.output_ids for h in [first, *joiners]] == expected
    assert [h.passes for h in [first, *joiners]] == [len(e) for e in expected]
    assert (sched.stats["separate_prefills"] >= 1) == separate


def test_step_cost_fit():
    cost = StepCost()
    assert cost.estimate() is None and not cost.separate_pass_pays(100)
    for positions in (16, 16, 256, 16, 128):
        cost.observe(positions, 0.5 + 0.01 * positions)
    fixed, per_position = cost.estimate()
    assert fixed == pytest.approx(0.5) and per_position == pytest.approx(0.01)
    assert cost.separate_pass_pays(60) and not cost.separate_pass_pays(40)


def test_events_stream_each_token_once_and_end_with_the_reason(streamed):
    ref, model = streamed
    with scheduler(model) as sched:
        handle = sched.submit(PROMPTS[2], greedy())
        events = list(handle)
    tokens = [t for e in events for t in e.token_ids]
    assert tokens == handle.output_ids == reference_tokens(ref, PROMPTS[2])
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == "length"


def test_stop_tokens_end_a_request_with_stop(streamed):
    ref, model = streamed
    full = reference_tokens(ref, PROMPTS[0])
    stop_at = full[4]
    with scheduler(model) as sched:
        handle = sched.generate([(PROMPTS[0], greedy(stop_token_ids=frozenset({stop_at})))])[0]
    assert handle.output_ids == full[: full.index(stop_at) + 1]
    assert handle.finish_reason == "stop"


def test_cancelled_request_leaves_and_others_are_unaffected(streamed):
    ref, model = streamed
    with scheduler(model) as sched:
        victim = sched.submit(PROMPTS[1], greedy(200))
        other = sched.submit(PROMPTS[3], greedy(30))
        next(iter(victim))
        victim.cancel()
        assert victim.wait(60) and other.wait(120)
    assert victim.finish_reason == "cancelled"
    assert len(victim.output_ids) < 200
    assert other.output_ids == reference_tokens(ref, PROMPTS[3], 30)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(streamed):
    _, model = streamed
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    with scheduler(model) as sched:
        alone = sched.generate([(PROMPTS[4], sampled)])[0].output_ids
        together = sched.generate([(PROMPTS[4], sampled)] + [(p, greedy()) for p in PROMPTS[:5]])
    assert together[0].output_ids == alone


def test_prompt_lookup_accepts_drafts_and_keeps_greedy_tokens(streamed):
    ref, model = streamed
    # Random tiny models fall into loops; a draft copied from the loop is then accepted.
    prompt, n = PROMPTS[2], 60
    expected = reference_tokens(ref, prompt, n)
    with scheduler(model) as sched:
        plain = sched.generate([(prompt, greedy(n))])[0]
        looked = sched.generate([(prompt, greedy(n, prompt_lookup=5))])[0]
        batch = sched.generate(
            [(prompt, greedy(n, prompt_lookup=5))] + [(p, greedy(n)) for p in PROMPTS[:3]]
        )
    assert plain.output_ids == looked.output_ids == batch[0].output_ids == expected
    assert plain.passes == n
    assert looked.passes <= n - 8, looked.passes  # at least 8 drafted tokens were accepted
    assert [h.output_ids for h in batch[1:]] == [reference_tokens(ref, p, n) for p in PROMPTS[:3]]


def test_a_draft_model_proposes_and_greedy_tokens_stay_the_reference(streamed):
    ref, model = streamed
    n, k = 24, 4
    expected = [reference_tokens(ref, p, n) for p in PROMPTS[:4]]
    # the reference itself as the draft: every draft is right, so each pass gives k + 1 tokens
    with scheduler(model, draft=DraftModel(ref, tokens=k)) as sched:
        exact = sched.generate([(p, greedy(n)) for p in PROMPTS[:4]])
    # an unrelated model as the draft: most drafts are wrong, the output must not change
    other = build_model("llama", dtype=torch.float32, seed=3)
    with scheduler(model, draft=DraftModel(other, tokens=k)) as sched:
        wrong = sched.generate([(p, greedy(n)) for p in PROMPTS[:4]])
        sampled = sched.generate([(PROMPTS[0], SamplingParams(max_new_tokens=5, temperature=1.0))])
    assert [h.output_ids for h in exact] == [h.output_ids for h in wrong] == expected
    for h, e in zip(exact, expected, strict=True):
        assert h.passes <= -(-len(e) // (k + 1)) + 1, (h.passes, len(e))
    assert max(h.passes for h in wrong) > n // 2
    assert sampled[0].passes == 5  # sampled requests get no drafts


def test_queue_limit_and_closing(streamed):
    _, model = streamed
    sched = scheduler(model, max_batch=1, max_queue=1)
    try:
        running = sched.submit(PROMPTS[0], greedy(200))
        next(iter(running))  # admitted, so the queue is empty again
        waiting = sched.submit(PROMPTS[1], greedy(5))
        with pytest.raises(QueueFullError, match="max_queue=1"):
            sched.submit(PROMPTS[2], greedy(5))
    finally:
        sched.close(cancel=True, timeout=60)
    assert running.finish_reason == "cancelled" and waiting.finish_reason == "cancelled"
    with pytest.raises(SchedulerClosedError):
        sched.submit(PROMPTS[0], greedy())


def test_close_without_cancel_finishes_in_flight_requests(streamed):
    ref, model = streamed
    sched = scheduler(model, max_batch=1)
    handles = [sched.submit(p, greedy(5)) for p in PROMPTS[:3]]
    sched.close(cancel=False, timeout=120)
    assert [h.output_ids for h in handles] == [reference_tokens(ref, p, 5) for p in PROMPTS[:3]]


def test_too_long_and_bad_requests_are_refused_by_field(streamed):
    _, model = streamed
    with scheduler(model) as sched:
        with pytest.raises(InvalidOptionError, match="prompt: 256 tokens"):
            sched.submit([1] * 256, greedy())
        with pytest.raises(InvalidOptionError, match="max_tokens"):
            sched.submit([1] * 200, greedy(100))
        with pytest.raises(InvalidOptionError, match="prompt: empty"):
            sched.submit([], greedy())
    with pytest.raises(InvalidOptionError, match="temperature"):
        SamplingParams(temperature=-1)


def test_concurrent_submitters_from_threads(streamed):
    ref, model = streamed
    results: dict[int, list[int]] = {}
    with scheduler(model, max_batch=8) as sched:

        def client(i: int) -> None:
            results[i] = sched.submit(PROMPTS[i], greedy()).result(120)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    assert [results[i] for i in range(len(PROMPTS))] == [reference_tokens(ref, p) for p in PROMPTS]


def test_a_family_with_a_sliding_window_runs_requests_one_at_a_time(tmp_path):
    ref = build_model("gemma2", dtype=torch.float32, seed=0)
    path = save_checkpoint(ref, tmp_path / "gemma2", sharded=False)
    prompt = list(range(1, 20))  # longer than its window of 8
    with AutoModel.from_pretrained(path) as model:
        with scheduler(model, max_batch=8) as sched:
            assert not sched.batchable and sched.max_batch == 1
            handles = sched.generate([(prompt, greedy()), (PROMPTS[0], greedy())])
    assert handles[0].output_ids == reference_tokens(ref, prompt)
    assert handles[1].output_ids == reference_tokens(ref, PROMPTS[0])
