"""rabbitllm.ray: the predictor in process (row formats, error rows, transformers' greedy text),
then whole jobs on a local Ray cluster: JSONL equal to `rabbit batch` byte for byte, Parquet with
the model, input and output on S3 (moto) through the block cache, and a worker that dies mid-job."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from rabbitllm.ray import (  # noqa: E402
    OUTPUT_SCHEMA,
    BatchInputError,
    RabbitLLMPredictor,
    run_batch_job,
)
from tests.serve.conftest import CONTEXT, oracle_ids  # noqa: E402

MAX_NEW = 6
#: Requests of every kind, a per-row setting, and rows that cannot run: a line that is not JSON, no
#: prompt, a field of the wrong type, a token id outside the vocabulary, a prompt longer than the
#: context, and a Batch API line.
LINES: list[object] = [
    {"id": "capital", "prompt": "The capital of France is"},
    {"prompt": "Once upon a time", "max_tokens": 3},
    {"id": "chat", "messages": [{"role": "user", "content": "Name a colour."}]},
    "",
    {"id": "ids", "prompt": [1, 2, 3, 4, 5]},
    "{not json",
    {"id": "no-prompt", "max_tokens": 3},
    {"id": "bad-type", "prompt": "x", "temperature": "hot"},
    {"id": "bad-token", "prompt": [1, 10**9]},
    {"id": "too-long", "prompt": [7] * (CONTEXT + 5)},
    {"custom_id": "api", "url": "/v1/completions", "body": {"prompt": "Hello", "max_tokens": 4}},
    {"id": "seeded", "prompt": "Pick a number:", "temperature": 0.9, "seed": 7},
    {"id": "stop", "prompt": "1, 2, 3, 4,", "stop": [" 7"]},
]
GOOD = ["capital", "line-2", "chat", "ids", "api", "seeded", "stop"]
BAD = {"line-6": None, "no-prompt": "prompt", "bad-type": "temperature", "bad-token": "prompt"}


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    """The single-process reference: the same predictor, in this process, without Ray."""
    p = RabbitLLMPredictor(str(tiny_model_dir), max_batch=4, max_new_tokens=MAX_NEW, device="cpu")
    yield p
    p.close()


# ---- in process ----------------------------------------------------------------------------------
def test_import_without_ray_names_the_extra(monkeypatch):
    from rabbit_store.errors import MissingDependencyError

    for name in [m for m in sys.modules if m == "rabbitllm.ray" or m.startswith("rabbitllm.ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees without the package
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "rabbitllm\[ray\]"'):
        import rabbitllm.ray  # noqa: F401


def test_rows_equal_transformers_greedy_and_bad_rows_name_the_row(predictor, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    oracle = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = ["The capital of France is", "Once upon a time there", "1 2 3"]
    table = pa.table(
        {
            "id": ["a", "b", "c", "d", "e", None],
            "prompt": [*prompts, None, "x", None],
            "max_tokens": [4, 6, 5, 3, None, 2],
            "seed": [None, None, None, None, "s", None],
            "stop_on_repetition": [None] * 6,  # an all-null column is an absent field
        }
    )
    out = predictor(table)
    assert out.schema == OUTPUT_SCHEMA and out.num_rows == 6
    rows = out.to_pylist()
    for row, prompt, n in zip(rows, prompts, [4, 6, 5], strict=False):
        ids = tok(prompt).input_ids
        expected = oracle_ids(oracle, ids, n)
        assert row["text"] == tok.decode(expected, skip_special_tokens=True), row
        assert (row["prompt_tokens"], row["completion_tokens"]) == (len(ids), len(expected))
        assert row["finish_reason"] == "length" and row["error"] is None
    # no line column: errors name the row by its id (or say it has none); nothing is dropped
    assert rows[3]["id"] == "d" and rows[3]["error_param"] == "prompt"
    assert rows[3]["error"].startswith("row 'd': missing field prompt")
    assert rows[4]["error_param"] == "seed" and rows[4]["error"].startswith("row 'e': seed:")
    assert rows[5]["id"] is None and rows[5]["error"].startswith("a row without an id:")


def test_every_batch_format_gives_the_same_rows(predictor):
    import numpy as np
    import pandas as pd

    rows = [
        {"id": "t", "prompt": "Hello there", "line": 1},
        {"id": "i", "prompt": [5, 6, 7], "line": 2},
        {"id": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "line": 3},
    ]
    # Arrow holds one type per column: the token-id prompt goes alone (pandas and numpy hold both)
    text_rows = predictor(
        pa.table(
            {
                "id": ["t", "m"],
                "prompt": ["Hello there", None],
                "messages": [None, rows[2]["messages"]],
                "max_tokens": [None, 3],
                "line": [1, 3],
            }
        )
    ).to_pylist()
    expected = [text_rows[0], *predictor(pa.Table.from_pylist([rows[1]])).to_pylist(), text_rows[1]]
    assert [r["line"] for r in expected] == [1, 2, 3]
    frame = pd.DataFrame(rows)  # max_tokens NaN where missing, prompts of two types: objects
    assert predictor(frame).to_pylist() == expected
    numpy_batch = {name: np.array(list(frame[name]), dtype=object) for name in frame.columns}
    numpy_batch["line"] = np.array([1, 2, 3])
    assert predictor(numpy_batch).to_pylist() == expected


def test_rows_of_one_call_share_the_weight_passes(predictor):
    before = predictor.scheduler.stats["passes"]
    table = pa.table({"prompt": [f"Story number {i}:" for i in range(4)], "line": [1, 2, 3, 4]})
    out = predictor(table).to_pylist()
    passes = predictor.scheduler.stats["passes"] - before
    assert all(r["completion_tokens"] == MAX_NEW for r in out)
    # one row at a time would take 4 x 6 = 24 passes; together about 6 (a row submitted while the
    # scheduler is already stepping joins one or two passes later)
    assert passes < 2 * MAX_NEW


def test_bad_job_arguments_fail_before_anything_runs(tmp_path):
    good = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    with pytest.raises(BatchInputError, match=r"format comes from the extension"):
        run_batch_job(str(tmp_path / "in.csv"), str(tmp_path / "out.jsonl"))
    with pytest.raises(BatchInputError, match=r"directory .*missing does not exist"):
        run_batch_job(str(good), str(tmp_path / "missing" / "out.jsonl"))
    with pytest.raises(BatchInputError, match=r"is the input file"):
        run_batch_job(str(good), str(good))
    dup = write_jsonl(
        tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]
    )
    with pytest.raises(BatchInputError, match=r"id 'a' is on line 1 and on line 2"):
        run_batch_job(str(dup), str(tmp_path / "out.jsonl"))
    with pytest.raises(BatchInputError, match=r"no such file"):
        run_batch_job(str(tmp_path / "nothing.jsonl"), str(tmp_path / "out.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.jsonl", "in.jsonl"]


def test_cli_flags_become_predictor_keywords(tiny_model_dir):
    from rabbitllm.cli import build_parser
    from rabbitllm.cli.options import ModelSpec, model_spec
    from rabbitllm.ray import options_from_cli

    argv = ["batch", "in.jsonl", "-o", "out.jsonl", "--model", str(tiny_model_dir)]
    argv += ["--max-new-tokens", "5", "--temperature", "0.5", "--seed", "3", "--max-batch", "2"]
    argv += ["--dtype", "float32", "--max-memory", "auto", "--no-stop-on-repetition"]
    args = build_parser().parse_args(argv)
    options = options_from_cli(args, model_spec(args, progress=False))
    assert options["model"] == str(tiny_model_dir) and options["max_batch"] == 2
    assert (options["max_new_tokens"], options["temperature"], options["seed"]) == (5, 0.5, 3)
    assert options["stop_on_repetition"] is False
    # streaming flags travel unresolved: each worker resolves "auto" on its own machine
    assert (options["dtype"], options["max_memory"]) == ("float32", "auto")
    options.pop("max_batch")
    predictor = RabbitLLMPredictor(**options)  # every keyword is one the predictor takes
    try:
        assert predictor.scheduler.max_batch == 16 and predictor.sampler.seed == 3
    finally:
        predictor.close()
    default = build_parser().parse_args(["batch", "in.jsonl", "-o", "out.jsonl"])
    spec = ModelSpec("/driver/path", is_default=True)
    assert options_from_cli(default, spec)["model"] is None  # each worker builds its own


# ---- on a local Ray cluster ----------------------------------------------------------------------
@pytest.mark.slow
def test_jsonl_job_equals_rabbit_batch_row_for_row(
    ray_cluster, tiny_model_dir, tmp_path, isolated_logging
):
    from rabbitllm.cli import build_parser, main
    from rabbitllm.cli.options import model_spec
    from rabbitllm.ray import options_from_cli

    source = write_jsonl(tmp_path / "in.jsonl", LINES)
    single, out = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    argv = ["batch", str(source), "-o", str(single), "--model", str(tiny_model_dir)]
    argv += ["--max-new-tokens", str(MAX_NEW), "--max-batch", "4", "--device", "cpu", "-q"]
    assert main(argv) != 0  # the bad lines
    args = build_parser().parse_args(argv)
    result = run_batch_job(
        str(source),
        str(out),
        address=None,  # the fixture's cluster
        concurrency=2,
        batch_size=3,  # several blocks per worker
        progress=False,
        **options_from_cli(args, model_spec(args, progress=False)),
    )
    assert out.read_bytes() == single.read_bytes()
    rows = rows_of(out)
    assert [r["id"] for r in rows if "error" not in r] == GOOD
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert {k: errors[k]["param"] for k in BAD} == BAD
    assert errors["too-long"]["line"] == 10 and "context" in errors["too-long"]["message"]
    assert errors["no-prompt"]["message"].startswith("line 7: missing field prompt")
    assert (result.rows, result.failed) == (len(rows), len(errors))
    assert result.completion_tokens == sum(
        r["usage"]["completion_tokens"] for r in rows if "usage" in r
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ray.jsonl")]  # no temp left


@pytest.mark.slow
def test_predictor_in_a_users_own_pipeline(ray_cluster, tiny_model_dir, predictor):
    """map_batches with Ray Data's defaults (numpy batches, one call at a time per actor)."""
    import ray

    items = [{"id": f"q{i}", "prompt": f"Question {i}:", "max_tokens": 2 + i} for i in range(5)]
    items.append({"id": "bad", "prompt": None, "max_tokens": 2})
    out = (
        ray.data.from_items(items)
        .map_batches(
            RabbitLLMPredictor,
            fn_constructor_kwargs={
                "model": str(tiny_model_dir),
                "max_new_tokens": MAX_NEW,
                "device": "cpu",
            },
            concurrency=1,
            batch_size=4,
        )
        .take_all()
    )
    expected = predictor(pa.Table.from_pylist(items)).to_pylist()
    assert sorted(out, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
    bad = next(r for r in out if r["id"] == "bad")
    assert bad["error"].startswith("row 'bad': missing field prompt")


@pytest.mark.slow
def test_parquet_job_reads_model_and_data_from_s3(
    ray_cluster, tiny_model_dir, s3, predictor, tmp_path
):
    fs, bucket = s3["fs"], s3["bucket"]
    fs.put(str(tiny_model_dir), f"{bucket}/tiny", recursive=True)
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(5)] + [None],
            "prompt": ["Hello", None, "The sky is", None, "Numbers: 1 2", "Hi"],
            "messages": [
                None,
                [{"role": "user", "content": "Say hi"}],
                None,
                None,
                None,
                None,
            ],
            "max_tokens": [3, 4, None, 2, None, 5],
            "seed": [None, None, None, None, "x", None],
        }
    )
    local = tmp_path / "in.parquet"
    pq.write_table(table, local)
    fs.put(str(local), f"{bucket}/in.parquet")
    options = s3["options"]
    result = run_batch_job(
        f"s3://{bucket}/in.parquet",
        f"s3://{bucket}/out/results.parquet",
        model=f"s3://{bucket}/tiny",
        storage_options=options,
        local_cache=True,
        address=None,
        concurrency=1,
        max_batch=4,
        batch_size=2,
        max_new_tokens=MAX_NEW,
        device="cpu",
        progress=False,
    )
    with fs.open(f"{bucket}/out/results.parquet", "rb") as f:
        out = pq.read_table(f)
    assert out.schema == OUTPUT_SCHEMA
    numbered = table.append_column("line", pa.array(range(1, 7), pa.int64()))
    assert out.to_pylist() == predictor(numbered).to_pylist()
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4", "line-6"]
    assert rows[3]["error_param"] == "prompt" and rows[3]["error"].startswith("line 4: missing")
    assert rows[4]["error_param"] == "seed"
    assert (result.rows, result.failed) == (6, 2)
    assert list((ray_cluster / "remote").rglob("*")), "the workers read through the block cache"


class DyingPredictor(RabbitLLMPredictor):
    """Dies (the whole worker process) at its second batch, the first time in the whole job."""

    def __init__(self, *, marker: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.marker = marker
        self.calls = 0
        with open(marker + ".starts", "a") as f:
            f.write(f"{os.getpid()}\n")

    def __call__(self, batch):
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_retried_and_each_row_is_written_once(
    ray_cluster, tiny_model_dir, predictor, tmp_path
):
    lines = [
        {"id": f"p{i}", "prompt": f"Item {i} of the list is", "max_tokens": 3} for i in range(8)
    ]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    marker = tmp_path / "died"
    result = run_batch_job(
        str(source),
        str(out),
        model=str(tiny_model_dir),
        address=None,
        concurrency=1,
        max_batch=4,
        batch_size=2,
        max_new_tokens=MAX_NEW,
        device="cpu",
        progress=False,
        predictor_class=DyingPredictor,
        marker=str(marker),
    )
    assert marker.exists(), "the worker never died: the test tested nothing"
    starts = (tmp_path / "died.starts").read_text().split()
    assert len(starts) == 2 and starts[0] != starts[1]  # a new process took over
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(8)]
    numbered = pa.table(
        {"request": [json.dumps(x).encode() for x in lines], "line": list(range(1, 9))}
    )
    expected = predictor(numbered).to_pylist()
    assert [r["text"] for r in rows] == [r["text"] for r in expected]
    assert result.rows == 8 and result.failed == 0


@pytest.mark.slow
def test_rabbit_batch_ray_local_starts_a_cluster_for_the_run(
    ray_cluster, tiny_model_dir, predictor, tmp_path
):
    import subprocess

    # this process already has a connection: asking for another cluster is refused, not ignored
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "A short one", "max_tokens": 2}])
    with pytest.raises(BatchInputError, match=r"already connected to Ray; pass address=None"):
        run_batch_job(str(source), str(tmp_path / "x.jsonl"), address="local")
    # a fresh process, through the CLI: "local" starts its own cluster and stops it afterwards
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "rabbitllm.cli", "batch", str(source), "-o", str(out)]
    command += ["--ray", "local", "--ray-cpus-per-worker", "1", "--model", str(tiny_model_dir)]
    command += ["--max-new-tokens", str(MAX_NEW), "--device", "cpu"]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 requests" in done.stderr and "on 1 Ray worker(s)" in done.stderr
    assert "Traceback" not in done.stderr
    expected = predictor(pa.table({"request": [source.read_bytes().strip()], "line": [1]}))
    assert rows_of(out)[0]["text"] == expected.to_pylist()[0]["text"]


class FailingPredictor(RabbitLLMPredictor):
    """The engine fails at the second batch (an error, not a dead worker: Ray does not retry it)."""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise RuntimeError("the pass failed (injected)")
        return super().__call__(batch)


@pytest.mark.slow
def test_a_failed_job_raises_and_leaves_no_output(ray_cluster, tiny_model_dir, tmp_path):
    lines = [{"prompt": f"Row {i}", "max_tokens": 2} for i in range(4)]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Exception, match=r"the pass failed \(injected\)"):
        run_batch_job(
            str(source),
            str(out),
            model=str(tiny_model_dir),
            address=None,
            batch_size=2,
            device="cpu",
            progress=False,
            predictor_class=FailingPredictor,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no OUT, no temp file


def test_results_are_written_in_input_order_each_exactly_once():
    from rabbitllm.ray.job import InOrder

    def rows(*lines):
        return [{"line": n} for n in lines]

    order = InOrder([1, 2, 4, 5])  # line 3 was blank
    assert order.add(rows(4, 5)) == []  # a later block first: held back
    assert order.add(rows(1)) == rows(1)
    assert order.add(rows(2)) == rows(2, 4, 5)
    order.finish()
    with pytest.raises(RuntimeError, match="line 1 came back twice"):
        InOrder([1, 2]).add(rows(1, 1))
    with pytest.raises(RuntimeError, match="line 3, which is not in the input"):
        InOrder([1, 2]).add(rows(3))
    short = InOrder([1, 2, 3])
    short.add(rows(1, 3))
    with pytest.raises(RuntimeError, match=r"1 results never came back \(the first: line 2\)"):
        short.finish()
