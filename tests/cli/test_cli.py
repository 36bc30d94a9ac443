"""`rabbit` end to end, in subprocesses, on the default model (offline), plus a few in-process
checks.

Runtime: every `rabbit` process imports torch and transformers (several seconds on two cores), so
independent runs are started together and awaited together, and generations are a few tokens long.
"""

from __future__ import annotations

import logging

import pytest

from tests.cli.conftest import finish, run_rabbit, start_rabbit

PROMPT = "What is the capital of France?"
N = "8"
SECRET = "hf_DoNotPrintMe0123456789"


@pytest.fixture(scope="module")
def reference(default_model_cache):
    """transformers' own greedy continuations of PROMPT, with and without the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_cache.model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_cache.model_dir).eval()

    def greedy(inputs):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=int(N), do_sample=False)
        return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    chat = greedy(
        tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
    )
    raw = greedy(dict(tok(PROMPT, return_tensors="pt")))
    assert chat != raw
    return {"chat": chat, "raw": raw}


# ---- generate ------------------------------------------------------------------------------------
def _offline_hub_cache(model_dir, root):
    """A hub cache holding `model_dir` as repo rabbit-test/smollm2 (what `hf download` would
    leave)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "models--rabbit-test--smollm2"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in model_dir.iterdir():
        (snapshot / path.name).symlink_to(path)
    return root


def test_generate_streams_the_greedy_text(default_model_cache, reference, tmp_path):
    env = default_model_cache.env
    hub_env = {
        **env,
        "HF_HUB_CACHE": str(_offline_hub_cache(default_model_cache.model_dir, tmp_path)),
    }
    runs = {
        "arg": start_rabbit(["generate", PROMPT, "-n", N, "--chat", "--profile"], env),
        "stdin": start_rabbit(
            ["generate", "-n", N, "--quiet"], env, stdin=PROMPT + "\n"
        ),  # template by default
        "no-chat": start_rabbit(["generate", PROMPT, "-n", N, "--no-chat", "-q"], env),
        "hub id": start_rabbit(
            ["generate", PROMPT, "-n", N, "-q", "-m", "rabbit-test/smollm2"], hub_env
        ),
    }
    results = {name: finish(proc) for name, proc in runs.items()}
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    assert results["arg"].stdout.strip() == reference["chat"]
    assert results["stdin"].stdout.strip() == reference["chat"]
    assert results["no-chat"].stdout.strip() == reference["raw"]
    assert results["hub id"].stdout.strip() == reference["chat"]  # offline, from the hub cache
    assert "tokens/s" in results["arg"].stderr
    assert "profile:" in results["arg"].stderr and "bottleneck" in results["arg"].stderr
    assert results["stdin"].stderr == "", "--quiet leaves stderr empty"


# ---- chat ----------------------------------------------------------------------------------------
def test_chat_keeps_the_conversation(default_model_cache):
    result = run_rabbit(
        ["chat", "-t", "0", "-n", "12", "-q"],
        default_model_cache.env,
        stdin="What is the capital of France?\nAnd of Germany?\n/exit\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = [line for line in result.stdout.splitlines() if line.strip()][:2]
    assert "Paris" in first
    assert "Berlin" in second  # "And of Germany?" only makes sense with the first turn remembered


def test_chat_session_reuses_the_cache_and_matches_a_fresh_run(default_model_cache):
    """In process, on transformers' own model: turn 2 runs only the new tokens and answers the
    same."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rabbit_engine.batching.requests import SamplingParams
    from rabbitllm.cli.chat import ChatSession

    tok = AutoTokenizer.from_pretrained(default_model_cache.model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_cache.model_dir).eval()
    seen: list[int] = []
    original_forward = model.forward

    def counting_forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        seen.append(0 if ids is None else ids.shape[1])
        return original_forward(*args, **kwargs)

    model.forward = counting_forward
    greedy = SamplingParams(max_new_tokens=10)
    session = ChatSession(model, tok, greedy)
    session.send("What is the capital of France?")
    history = copy.deepcopy(session.messages)
    seen.clear()
    reply = session.send("And of Germany?")
    conversation = tok.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
    conversation_len = len(
        conversation["input_ids"] if hasattr(conversation, "keys") else conversation
    )
    assert session.reused_tokens > 0
    assert seen[0] == conversation_len - session.reused_tokens, (
        "the prefill runs only what the cache lacks"
    )

    fresh = ChatSession(model, tok, greedy)
    fresh.messages = history
    assert fresh.send("And of Germany?") == reply


# ---- split, inspect, doctor ----------------------------------------------------------------------
def test_split_then_generate_from_the_split(default_model_cache, reference, tmp_path):
    env = default_model_cache.env
    src = str(default_model_cache.model_dir)
    loud = run_rabbit(["split", src, str(tmp_path / "loud")], env)
    quiet = run_rabbit(["split", src, str(tmp_path / "quiet"), "--quiet"], env)
    assert loud.returncode == 0 and quiet.returncode == 0, (
        loud.stderr[-3000:] + quiet.stderr[-3000:]
    )
    assert "split" in loud.stderr and "%" in loud.stderr, "the progress bar is shown by default"
    assert quiet.stderr == "" and quiet.stdout == "", "--quiet hides progress and summary"
    assert (tmp_path / "quiet" / "rabbit-split.json").is_file()

    runs = [
        start_rabbit(["generate", PROMPT, "-n", N, "-q", "--model", str(tmp_path / "quiet")], env),
        start_rabbit(["inspect", str(tmp_path / "quiet")], env),
    ]
    from_split, inspect = (finish(p) for p in runs)
    for result in (from_split, inspect):
        assert result.returncode == 0, result.stderr[-3000:]
    assert from_split.stdout.strip() == reference["chat"]
    assert "layers: 30" in inspect.stdout


def test_doctor(default_model_cache):
    result = run_rabbit(["doctor"], default_model_cache.env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    for topic in (
        "torch",
        "transformers",
        "cuda",
        "flash attention",
        "ram",
        "read speed",
        "cache dir",
        "default model",
    ):
        assert f" {topic} " in out, topic
    assert "supported: >=5.0,<6" in out
    assert str(default_model_cache.cache_dir) in out
    assert "MB/s" in out or "GB/s" in out


# ---- errors: one line on stderr, exit status 2 ---------------------------------------------------
ERROR_CASES = {
    "missing path": (["generate", "hi", "--model", "{tmp}/missing"], "is not a directory"),
    "no config.json": (["generate", "hi", "--model", "{tmp}/empty"], "no config.json"),
    "no tokenizer": (["chat", "--model", "{tmp}/no-tokenizer"], "has no tokenizer"),
    "bad dtype": (["generate", "hi", "--dtype", "float8"], "--dtype float8"),
    "bad device": (["generate", "hi", "--device", "tpu"], "--device tpu"),
    "bad max-memory": (["generate", "hi", "--max-memory", "lots"], "--max-memory lots"),
    "bad prefetch": (["generate", "hi", "--prefetch", "-1"], "--prefetch -1: prefetch=-1"),
    "bad temperature": (["generate", "hi", "--temperature", "-1"], "--temperature"),
    "unknown subcommand": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "unknown option": (["generate", "hi", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "no command": ([], "a command is required"),
    "empty prompt": (["generate"], "the prompt is empty"),
}
#: Run as real subprocesses through the installed script (the rest run `main()` in process: the
#: same code path without paying for a torch import per case).
SUBPROCESS_CASES = ("unknown subcommand", "bad dtype", "missing path")


@pytest.fixture(scope="module")
def error_dirs(default_model_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "empty").mkdir()
    no_tok = tmp / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).symlink_to(default_model_cache.model_dir / name)
    return tmp


@pytest.fixture(scope="module")
def subprocess_errors(default_model_cache, error_dirs):
    cases = {name: ERROR_CASES[name][0] for name in SUBPROCESS_CASES}
    cases["token stays secret"] = [
        "generate",
        "hi",
        "--model",
        "{tmp}/missing",
        "--token",
        SECRET,
        "--debug",
        "-v",
    ]
    procs = {
        name: start_rabbit([a.format(tmp=error_dirs) for a in args], default_model_cache.env)
        for name, args in cases.items()
    }
    return {name: finish(proc) for name, proc in procs.items()}


def _check_one_line_error(returncode: int, stdout: str, stderr: str, expected: str) -> None:
    assert returncode == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rabbit: error: ") and expected in lines[0], lines[0]
    assert stdout == ""


@pytest.mark.parametrize("case", sorted(set(ERROR_CASES) - set(SUBPROCESS_CASES)))
def test_user_errors_in_process(
    case, error_dirs, default_model_cache, monkeypatch, capsys, isolated_logging
):
    import io
    import sys

    from rabbitllm.cli import main

    monkeypatch.setenv("RABBITLLM_CACHE", str(default_model_cache.cache_dir))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    args, expected = ERROR_CASES[case]
    code = main([a.format(tmp=error_dirs) for a in args])
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.out, captured.err, expected)


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_user_errors_in_subprocess(case, subprocess_errors):
    result = subprocess_errors[case]
    _check_one_line_error(result.returncode, result.stdout, result.stderr, ERROR_CASES[case][1])


def test_token_never_printed(subprocess_errors):
    result = subprocess_errors["token stays secret"]
    assert result.returncode == 2
    assert "Traceback" in result.stderr, "--debug shows the traceback"
    assert SECRET not in result.stdout + result.stderr


# ---- in process: the console's redaction ---------------------------------------------------------
def test_console_redacts_secrets_everywhere(capsys):
    import io

    from rabbitllm.cli.console import Console, secret_values

    out, err = io.StringIO(), io.StringIO()
    console = Console(debug=True, stdout=out, stderr=err)
    console.add_secrets(
        secret_values(
            SECRET,
            {
                "key": "AKIA123",
                "client_kwargs": {"secret": "s3cr3t"},
                "endpoint_url": "http://localhost:9000",
            },
        )
    )
    console.result(f"token {SECRET}")
    console.note("key AKIA123 and s3cr3t at http://localhost:9000")
    try:
        raise ValueError(f"bad token {SECRET}")
    except ValueError as exc:
        console.error(str(exc), exc)
    logger = logging.getLogger("rabbit-test-redaction")
    logger.addHandler(console.logging_handler())
    logger.warning("opening with token=%s", SECRET)
    text = out.getvalue() + err.getvalue()
    for secret in (SECRET, "AKIA123", "s3cr3t"):
        assert secret not in text
    assert "http://localhost:9000" in text and text.count("***") >= 5


# ---- in process: the tokenizer of a remote store -------------------------------------------------
def test_tokenizer_from_a_remote_store_is_fetched(default_model_cache):
    """A store with no local paths (fsspec memory://): the tokenizer files are copied, then
    loaded."""
    import uuid

    import fsspec
    from transformers import AutoTokenizer

    from rabbit_store import open_source
    from rabbitllm.cli.errors import TokenizerNotFoundError
    from rabbitllm.cli.loading import load_tokenizer, tokenizer_files

    fs = fsspec.filesystem("memory")
    root = f"/rabbit-cli-{uuid.uuid4().hex}"
    local = open_source(str(default_model_cache.model_dir))
    names = tokenizer_files(local)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(names)
    try:
        for name in names:
            fs.pipe(f"{root}/with/{name}", local.read_bytes(name))
        fs.pipe(f"{root}/without/config.json", local.read_bytes("config.json"))
        remote = open_source(f"memory://{root}/with")
        assert remote.local_path("tokenizer.json") is None
        tokenizer = load_tokenizer(remote)
        expected = AutoTokenizer.from_pretrained(default_model_cache.model_dir)
        assert tokenizer(PROMPT)["input_ids"] == expected(PROMPT)["input_ids"]
        assert tokenizer.chat_template == expected.chat_template
        with pytest.raises(TokenizerNotFoundError, match="has no tokenizer"):
            load_tokenizer(open_source(f"memory://{root}/without"))
    finally:
        fs.rm(root, recursive=True)


@pytest.mark.parametrize(
    "argv, quiet",
    [
        (["--quiet", "generate", "x"], True),
        (["generate", "x", "-q"], True),
        (["generate", "x"], False),
        (["--quiet", "split", "a", "b"], True),  # split defines its own --quiet; ours still counts
        (["split", "a", "b", "--quiet"], True),
        (["split", "a", "b"], False),
    ],
)
def test_common_flags_before_or_after_the_command(argv, quiet):
    from rabbitllm.cli.app import build_parser, merge_common_options

    args = build_parser().parse_args(argv)
    merge_common_options(args)
    assert args.quiet is quiet and args.debug is False
