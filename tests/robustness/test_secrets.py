"""Tokens and secret keys never appear in logs, reprs, error messages, manifests or CLI output.

A recognisable hub token and S3 secret key go through every entry point (open_source, the index,
inspect, split, AutoModel.from_pretrained, the CLI) on a hub-cache source, a (gated) hub server
and S3 (moto); everything those produce is searched for them: log records at DEBUG from every
logger (botocore and huggingface_hub included), reprs, the messages of failing calls and their
causes, every file the split writes, CLI stdout and stderr with --debug.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import pytest

from rabbit_store import CheckpointIndex, LayerPlan, open_source, split_checkpoint
from rabbit_store.errors import RabbitError
from rabbit_store.inspect import describe
from tests.store.store_helpers import (
    make_hub_cache,
    model_tensors,
    odd_shards,
    upload,
    write_checkpoint,
)

from .conftest import cli_env, finish, start_store_cli
from .test_remote_faults import GatedHub

TOKEN = "hf_SECRET_abc123"
S3_SECRET = "s3SECRETkey987xyz"
REPO = "rabbit-org/tiny-secret"


class Evidence:
    """Everything produced along the way, to be searched for secrets at the end."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.texts: list[tuple[str, str]] = []

    def add(self, what: str, value: object) -> None:
        self.texts.append((what, value if isinstance(value, str) else repr(value)))

    def error(self, what: str, exc: BaseException) -> None:
        self.add(what, "".join(traceback.format_exception(exc)))  # the whole chain, causes included
        chained: BaseException | None = exc
        while chained is not None:
            self.add(f"{what} (chain)", str(chained))
            chained = chained.__cause__ or chained.__context__

    def files(self, root: Path) -> None:
        for path in root.rglob("*"):
            if path.is_file():
                self.add(str(path), path.read_bytes().decode("utf-8", "replace"))

    def cli(self, *runs: tuple[str, list[str], int], env: dict[str, str]) -> None:
        """`rabbit-store --debug -v ARGS` for each (name, args, expected exit status), all at
        once."""
        procs = [
            (what, start_store_cli("--debug", "-v", *args, env=env), code)
            for what, args, code in runs
        ]
        for what, proc, code in procs:
            result = finish(proc)
            assert result.returncode == code, (what, result.stderr[-2000:])
            self.add(f"{what} stdout", result.stdout)
            self.add(f"{what} stderr", result.stderr)

    def assert_clean(self, *secrets: str) -> None:
        records = [r.getMessage() for r in self.caplog.records]
        assert len(records) >= 5, "DEBUG logging was captured"
        for secret in secrets:
            leaks = [what for what, text in self.texts if secret in text]
            leaks += [f"log: {m[:200]}" for m in records if secret in m]
            assert not leaks, (secret, leaks)


@pytest.fixture
def evidence(caplog: pytest.LogCaptureFixture) -> Evidence:
    caplog.set_level(logging.DEBUG)  # every logger, third-party ones included
    return Evidence(caplog)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    tensors = model_tensors(num_layers=3)
    checkpoint = write_checkpoint(tmp_path / "ckpt", tensors, odd_shards(tensors))
    cache = tmp_path / "hub-cache"
    make_hub_cache(cache, REPO, checkpoint.path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_token_stays_secret(hub_cache: Path, tmp_path: Path, evidence: Evidence):
    source = open_source(REPO, token=TOKEN)
    index = CheckpointIndex.load(source)
    evidence.add("source repr", source)
    evidence.add("source location", source.location)
    evidence.add("index repr", index)
    evidence.add("plan repr", LayerPlan.from_index(index))
    evidence.add("describe", json.dumps(describe(REPO, token=TOKEN)))
    manifest = split_checkpoint(REPO, tmp_path / "split", token=TOKEN, progress=False)
    evidence.add("manifest repr", manifest)
    evidence.files(tmp_path / "split")
    with pytest.raises(RabbitError) as err:
        open_source("rabbit-org/absent", token=TOKEN)
    evidence.error("absent repo", err.value)

    evidence.cli(
        ("inspect", ["inspect", REPO, "--token", TOKEN], 0),
        ("split", ["split", REPO, str(tmp_path / "cli-split"), "--token", TOKEN], 0),
        ("absent", ["inspect", "rabbit-org/absent", "--token", TOKEN], 2),
        env=cli_env(HF_HUB_CACHE=str(hub_cache)),
    )
    evidence.files(tmp_path / "cli-split")
    evidence.assert_clean(TOKEN)


def test_hub_token_sent_to_the_hub_but_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evidence: Evidence
):
    from huggingface_hub import constants

    with GatedHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        with pytest.raises(RabbitError) as err:
            open_source("rabbit-org/gated", token=TOKEN)
        evidence.error("gated", err.value)
        pytest.importorskip("torch", reason="AutoModel needs torch")
        from rabbitllm import AutoModel

        with pytest.raises(RabbitError) as err:
            AutoModel.from_pretrained("rabbit-org/gated", token=TOKEN)
        evidence.error("AutoModel gated", err.value)
        evidence.cli(
            ("gated", ["inspect", "rabbit-org/gated", "--token", TOKEN], 2),
            env=cli_env(
                HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "hub-cache")
            ),
        )
    assert (
        hub.authorizations.count(f"Bearer {TOKEN}") == 3
    )  # the token did go to the hub, each time
    evidence.assert_clean(TOKEN)


def test_automodel_from_a_hub_cache_with_a_token(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evidence: Evidence
):
    from huggingface_hub import constants

    from rabbitllm import AutoModel

    cache = tmp_path / "hub-cache"
    make_hub_cache(cache, "rabbit-org/tiny-llama", tiny_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "rabbit-cache"))
    model = AutoModel.from_pretrained("rabbit-org/tiny-llama", token=TOKEN)
    evidence.add("model repr", model)
    evidence.add("streamer", vars(model._rabbit_streamer))
    model.close()
    with pytest.raises(RabbitError) as err:
        AutoModel.from_pretrained("rabbit-org/tiny-llama", token=TOKEN, device="tpu")
    evidence.error("bad device", err.value)
    evidence.assert_clean(TOKEN)


def test_s3_secret_key_stays_secret(s3, tmp_path: Path, evidence: Evidence):
    options = {**s3["options"], "secret": S3_SECRET}  # moto accepts any secret
    tensors = model_tensors(num_layers=3)
    checkpoint = write_checkpoint(tmp_path / "ckpt", tensors, odd_shards(tensors))
    url = f"s3://{s3['bucket']}/model"
    upload(s3["fs"], checkpoint.path, url)

    source = open_source(url, storage_options=options)
    index = CheckpointIndex.load(source)
    evidence.add("source repr", source)
    evidence.add("index repr", index)
    evidence.add("describe", json.dumps(describe(url, storage_options=options)))
    manifest = split_checkpoint(
        checkpoint.path, f"{url}-split", dest_storage_options=options, progress=False
    )
    evidence.add("manifest", manifest)
    evidence.add("s3 manifest", s3["fs"].cat_file(f"{url}-split/rabbit-split.json").decode())
    with pytest.raises(RabbitError) as err:
        open_source(f"s3://{s3['bucket']}/missing", storage_options=options)
    evidence.error("missing prefix", err.value)

    env = cli_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    so = [
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
        "--storage-option",
        "key=testing",
        "--storage-option",
        f"secret={S3_SECRET}",
    ]
    evidence.cli(
        ("inspect", ["inspect", url, *so], 0),
        ("split", ["split", url, str(tmp_path / "cli-split"), *so], 0),
        ("missing", ["inspect", f"s3://{s3['bucket']}/missing", *so], 2),
        env=env,
    )
    evidence.files(tmp_path / "cli-split")
    evidence.assert_clean(S3_SECRET)
