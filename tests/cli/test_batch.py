"""`rabbit batch`: the JSONL input and the crash-safe output in process, then real `rabbit batch`
runs on a tiny random model with the default model's tokenizer, checked row for row against
transformers' own greedy `generate` of each prompt alone."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rabbitllm.cli.batch import read_input
from rabbitllm.cli.batch_output import OutputFile, output_lock
from rabbitllm.cli.errors import UsageError
from rabbitllm.request_lines import command_config, parse_line
from tests.cli.conftest import finish, rabbit_command, run_rabbit, start_rabbit


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the input, in process -----------------------------------------------------------------------
def test_input_lines_are_requests_or_errors_naming_the_line(tmp_path):
    path = write_lines(
        tmp_path / "in.jsonl",
        [
            {"prompt": "a"},
            {"id": "chat-1", "messages": [{"role": "user", "content": "hi"}]},
            "",  # blank lines are no request
            {"custom_id": "api-1", "url": "/v1/chat/completions", "body": {"messages": []}},
            {"max_tokens": 3},
            "{not json",
            {"id": 7, "prompt": "x"},
            ["prompt"],
            {"prompt": "p", "messages": []},
            {"custom_id": "api-2", "url": "/v1/embeddings", "body": {"input": "x"}},
        ],
    )
    lines = read_input(path)
    by_id = {line.id: line for line in lines}
    assert [line.number for line in lines] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert by_id["line-1"].kind == "completion" and by_id["line-1"].body == {"prompt": "a"}
    assert by_id["chat-1"].kind == "chat" and by_id["chat-1"].error is None
    assert by_id["api-1"].kind == "chat" and by_id["api-1"].body == {"messages": []}
    errors = {line.id: line.error for line in lines if line.error is not None}
    assert set(errors) == {"line-5", "line-6", "line-7", "line-8", "line-9", "api-2"}
    assert errors["line-5"].param == "prompt" and "line 5: missing field prompt" in (
        errors["line-5"].message
    )
    assert errors["line-6"].message.startswith("line 6: not valid JSON")
    assert errors["line-7"].param == "id" and "expected a non-empty string, got 7" in (
        errors["line-7"].message
    )
    assert "expected a JSON object, got list" in errors["line-8"].message
    assert errors["line-9"].param == "messages"
    assert errors["api-2"].param == "url" and "'/v1/embeddings'" in errors["api-2"].message
    row = errors["line-6"].row("line-6")
    assert row["id"] == "line-6" and row["error"]["line"] == 6 and "text" not in row


def test_duplicate_ids_are_refused_naming_both_lines(tmp_path):
    path = write_lines(
        tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]
    )
    with pytest.raises(UsageError, match="id 'a' is on line 1 and on line 2"):
        read_input(path)
    # an explicit id may collide with the default id of another line
    path = write_lines(tmp_path / "in2.jsonl", [{"prompt": "x"}, {"id": "line-1", "prompt": "y"}])
    with pytest.raises(UsageError, match="id 'line-1' is on line 1 and on line 2"):
        read_input(path)


def test_command_flags_are_defaults_below_a_line_and_above_the_model():
    from transformers import GenerationConfig

    from rabbitllm.openai_requests import prepare

    model = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=100)
    args = argparse.Namespace(
        max_new_tokens=5, temperature=0.0, top_p=None, top_k=None, repetition_penalty=1.2
    )
    config = command_config(model, args)
    assert model.max_new_tokens == 100 and model.do_sample  # the model's own is left alone
    tok = FakeTokenizer()

    def params(body):
        return prepare(body, "completion", tok, config, max_context=8, max_tokens_limit=8).params

    plain = params({"prompt": [1, 2]})
    assert (plain.max_new_tokens, plain.temperature, plain.repetition_penalty) == (5, 0.0, 1.2)
    own = params({"prompt": [1, 2], "max_tokens": 3, "temperature": 0.5})
    assert (own.max_new_tokens, own.temperature, own.top_p) == (3, 0.5, 0.9)
    # a default max_tokens shrinks to the room the prompt leaves; a line's own would be refused
    assert params({"prompt": [1, 2, 3, 4, 5]}).max_new_tokens == 3
    assert command_config(None, args).max_new_tokens == 5  # a model without a config


class FakeTokenizer:
    """Token-id prompts only: what `prepare` and `final_text` need of a tokenizer for them."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 10

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


def test_a_failed_step_stops_the_run_and_keeps_the_finished_rows(tmp_path):
    """The engine's failure is not a line's: the rows finished before it are on disk, the error
    reaches the command (exit 1), and nothing is written for the requests it broke."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rabbit_engine.batching.scheduler import BatchScheduler
    from rabbitllm.cli.batch import Progress, Totals, run_lines
    from rabbitllm.request_lines import Sampler

    config = LlamaConfig(
        vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    forward, calls = model.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("the disk went away")
        return forward(*args, **kwargs)

    model.forward = failing_forward
    lines = [
        parse_line(1, b'{"id": "a", "prompt": [1, 2], "max_tokens": 2}'),
        parse_line(2, b'{"id": "b", "prompt": [3], "max_tokens": 2}'),
        parse_line(3, b'{"id": "c", "prompt": [4], "max_tokens": 30}'),
        parse_line(4, b'{"id": "d", "prompt": [5], "max_tokens": 30}'),
    ]
    args = argparse.Namespace(
        max_new_tokens=None, temperature=0.0, top_p=None, top_k=None, repetition_penalty=None,
        seed=None, prompt_lookup=None, stop_on_repetition=False,
    )  # fmt: skip
    out = OutputFile(tmp_path / "out.jsonl")
    out.open(line.id for line in lines)
    scheduler = BatchScheduler(model, max_batch=2, max_queue=4, eos_token_ids={0})
    sampler = Sampler(args, FakeTokenizer(), model.generation_config, scheduler.max_context)
    progress = Progress(len(lines), disable=True)
    try:
        with pytest.raises(RuntimeError, match="the disk went away"):
            run_lines(
                scheduler, lines, sampler, out, in_flight_limit=2, progress=progress,
                totals=Totals(),
            )  # fmt: skip
    finally:
        scheduler.close()
        out.close()
    rows = rows_of(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ["a", "b"]
    assert all(r["usage"]["completion_tokens"] == 2 for r in rows)


# ---- the output, in process ----------------------------------------------------------------------
def ok_row(request_id: str, text: str = "t") -> dict:
    return {"id": request_id, "text": text, "finish_reason": "length", "usage": {}}


def test_output_appends_whole_lines_and_ends_in_input_order(tmp_path):
    path = tmp_path / "out.jsonl"
    out = OutputFile(path)
    out.open(["a", "b", "c"])
    assert path.exists() and out.done == set()
    out.append([ok_row("c")])
    out.append([ok_row("a", "x\ny"), ok_row("b")])  # a newline in the text stays escaped
    assert [r["id"] for r in rows_of(path)] == ["c", "a", "b"]
    assert out.finish(["a", "b", "c"]) is True
    assert [r["id"] for r in rows_of(path)] == ["a", "b", "c"]
    assert rows_of(path)[0]["text"] == "x\ny"
    assert not [p for p in tmp_path.iterdir() if p.name != "out.jsonl"]  # no temporary left
    again = OutputFile(path)
    again.open(["a", "b", "c"])
    assert again.done == {"a", "b", "c"}
    assert again.finish(["a", "b", "c"]) is False  # already in order: not rewritten


def test_output_left_by_a_killed_run_is_repaired(tmp_path):
    """A half line is cut away, error rows are dropped (their lines run again), done ids kept."""
    path = tmp_path / "out.jsonl"
    good = [ok_row("b"), {"id": "a", "error": {"message": "m", "line": 1, "param": None}}]
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good) + b'{"id": "c", "te')
    out = OutputFile(path)
    out.open(["a", "b", "c"])
    assert out.done == {"b"} and out.dropped_errors == 1 and out.dropped_partial > 0
    assert [r["id"] for r in rows_of(path)] == ["b"]
    out.append([ok_row("c")])
    out.close()
    assert path.read_text().endswith("\n")
    assert [r["id"] for r in rows_of(path)] == ["b", "c"]

    only_half = tmp_path / "half.jsonl"  # a crash during the very first write
    only_half.write_bytes(b'{"id": "a", "text": "x')
    out = OutputFile(only_half)
    out.open(["a"])
    assert out.done == set() and only_half.read_bytes() == b""
    out.close()


def test_output_that_is_not_ours_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    write_lines(path, [ok_row("a"), ok_row("zz")])
    with pytest.raises(UsageError, match=r"line 2: id 'zz' is not in the input"):
        OutputFile(path).open(["a", "b"])
    write_lines(path, [ok_row("a"), ok_row("a")])
    with pytest.raises(UsageError, match="id 'a' is on line 1 and on line 2"):
        OutputFile(path).open(["a"])
    write_lines(path, ["not json", ok_row("a")])
    with pytest.raises(UsageError, match="line 1: not a row written by rabbit batch"):
        OutputFile(path).open(["a"])


def test_one_writer_per_output(tmp_path):
    path = tmp_path / "out.jsonl"
    with output_lock(path):
        with pytest.raises(UsageError, match="another rabbit batch is writing"):
            with output_lock(path):
                pass
    with output_lock(path):  # released
        pass
    assert not (tmp_path / "out.jsonl.lock").exists()


# ---- real `rabbit batch` runs --------------------------------------------------------------------
N = 12  # new tokens per request


@pytest.fixture(scope="module")
def tiny(default_model_cache, tmp_path_factory):
    """A tiny random Llama saved with the default model's tokenizer (and chat template), and
    transformers' own greedy `generate` of one body at a time: the oracle."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_cache.model_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # wide weights spread the logits out: no near-ties for batched float32 sums to flip
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_sample=False
    )
    where = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(where)
    tok.save_pretrained(where)

    def oracle(body: dict) -> tuple[str, str, int]:
        """(text, finish_reason, tokens) of transformers' greedy generate of `body` alone."""
        if "messages" in body:
            text = tok.apply_chat_template(
                body["messages"], add_generation_prompt=True, tokenize=False
            )
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tok(body["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=body.get("max_tokens", N),
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        finish = "stop" if new and new[-1] == tok.eos_token_id else "length"
        return tok.decode(new, skip_special_tokens=True), finish, len(new)

    return where, oracle


PROMPTS = [
    {"prompt": "The capital of France is"},
    {"id": "chat-a", "messages": [{"role": "user", "content": "What is 2 + 2?"}]},
    {"prompt": "Once upon a time", "max_tokens": 5},
    {
        "id": "long",
        "prompt": "A much longer prompt, so that the rows of a batch differ in length "
        "and the shorter ones are padded: one two three four five six seven eight nine ten",
    },
    {
        "custom_id": "api-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
            ]
        },
    },
    {"prompt": "def fibonacci(n):"},
    {"id": "chat-b", "messages": [{"role": "user", "content": "Hello!"}]},
    {"prompt": "1, 2, 3,"},
]


def batch_args(tiny_dir: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "batch", str(inp), "-o", str(out), "--model", str(tiny_dir), "-n", str(N),
        "--temperature", "0", "--no-stop-on-repetition", "--device", "cpu", *extra,
    ]  # fmt: skip


def body_of(line: dict) -> dict:
    return line.get("body", line)


def line_id(number: int, line: dict) -> str:
    return line.get("custom_id") or line.get("id") or f"line-{number}"


def test_batch_rows_equal_each_prompt_alone(default_model_cache, tiny, tmp_path):
    """Eight requests four at a time, joining as others leave: each row is the text of that
    prompt generated alone by transformers, in input order, with its usage. Again with the model
    as its own draft (--draft-model): every draft is accepted, so a pass gives more tokens than
    there are rows, and the text stays the same."""
    tiny_dir, oracle = tiny
    inp = write_lines(tmp_path / "in.jsonl", PROMPTS)
    env = default_model_cache.env
    outs = {"plain": tmp_path / "plain.jsonl", "draft": tmp_path / "draft.jsonl"}
    runs = {
        "plain": start_rabbit(batch_args(tiny_dir, inp, outs["plain"], "--max-batch", "4"), env),
        "draft": start_rabbit(
            batch_args(
                tiny_dir, inp, outs["draft"], "--max-batch", "4", "--draft-model", str(tiny_dir)
            ),
            env,
        ),
    }
    per_pass = {}
    for name, proc in runs.items():
        result = finish(proc)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = rows_of(outs[name])
        assert [r["id"] for r in rows] == [line_id(i, p) for i, p in enumerate(PROMPTS, start=1)]
        for row, line in zip(rows, PROMPTS, strict=True):
            text, finish_reason, tokens = oracle(body_of(line))
            assert (row["text"], row["finish_reason"]) == (text, finish_reason), (name, row["id"])
            usage = row["usage"]
            assert usage["completion_tokens"] == tokens
            assert usage["total_tokens"] == usage["prompt_tokens"] + tokens
        assert "tok/s" in result.stderr  # the progress bar's postfix
        summary = re.search(
            r"\[8 requests, (\d+) tokens in .* ([\d.]+) tokens per streamed pass", result.stderr
        )
        assert summary, result.stderr[-2000:]
        per_pass[name] = float(summary[2])
    assert 1.5 < per_pass["plain"] <= 4  # the prompts shared passes, never more than 4 at once
    assert per_pass["draft"] > 4


def test_bad_lines_become_error_rows_and_a_nonzero_exit(default_model_cache, tiny, tmp_path):
    tiny_dir, oracle = tiny
    lines = [
        {"prompt": "Good line"},
        {"max_tokens": 3},  # no prompt
        {"prompt": "x", "max_tokens": "ten"},
        {"messages": "hello"},
        "{this is not json",
        {"id": "good-2", "prompt": "Another good line"},
        {"prompt": "x", "temperature": "hot"},
    ]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    result = run_rabbit(batch_args(tiny_dir, inp, out), default_model_cache.env)
    assert result.returncode == 2, result.stderr[-3000:]
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [f"line-{i}" for i in range(1, 6)] + ["good-2", "line-7"]
    assert rows[0]["text"] == oracle({"prompt": "Good line"})[0]
    assert rows[5]["text"] == oracle({"prompt": "Another good line"})[0]
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert {k: (e["line"], e["param"]) for k, e in errors.items()} == {
        "line-2": (2, "prompt"),
        "line-3": (3, "max_tokens"),
        "line-4": (4, "messages"),
        "line-5": (5, None),
        "line-7": (7, "temperature"),
    }
    for key, error in errors.items():
        assert error["message"].startswith(f"line {error['line']}: "), key
    assert "not valid JSON" in errors["line-5"]["message"]
    summary = result.stderr.strip().splitlines()[-1]
    expected = "rabbit: error: 5 of 7 input lines could not run (lines 2, 3, 4, 5, 7)"
    assert summary.startswith(expected)


def test_duplicate_ids_refused_before_anything_runs(default_model_cache, tiny, tmp_path):
    tiny_dir, _ = tiny
    inp = write_lines(
        tmp_path / "in.jsonl",
        [{"id": "a", "prompt": "x"}, {"prompt": "y"}, {"id": "a", "prompt": "z"}],
    )
    out = tmp_path / "out.jsonl"
    result = run_rabbit(batch_args(tiny_dir, inp, out), default_model_cache.env)
    assert result.returncode == 2
    assert "id 'a' is on line 1 and on line 3" in result.stderr
    assert not out.exists()


def test_killed_run_resumes_with_each_id_once(default_model_cache, tiny, tmp_path):
    """SIGKILL once some rows are written; a half line is then added by hand (as a crash inside a
    write would leave it); the rerun drops it, skips the finished ids and completes the rest."""
    tiny_dir, oracle = tiny
    count = 48
    lines = [{"prompt": f"Request number {i}:", "max_tokens": 40} for i in range(count)]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    args = batch_args(tiny_dir, inp, out, "--max-batch", "2")
    with open(tmp_path / "killed.err", "wb") as err:
        proc = subprocess.Popen(
            [*rabbit_command(), *args], stdout=subprocess.DEVNULL, stderr=err,
            env=default_model_cache.env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    first = out.read_bytes()
    whole = first[: first.rfind(b"\n") + 1]  # (a kill inside a write may leave a half line)
    done = [json.loads(line)["id"] for line in whole.splitlines()]
    assert 2 <= len(done) < count, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    if first == whole:
        with open(out, "ab") as f:
            f.write(b'{"id": "line-40", "text": "half a li')

    result = run_rabbit(args, default_model_cache.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming: {len(done)} of {count} requests are already in" in result.stderr
    assert "half-written line" in result.stderr
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [f"line-{i}" for i in range(1, count + 1)]
    for row, line in zip(rows, lines, strict=True):
        assert row["text"] == oracle(line)[0], row["id"]
