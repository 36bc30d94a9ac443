"""Remote stores that fail: transient errors retried with backoff, permanent ones reported at once;
S3 with a wrong bucket or no credentials; a gated hub repo without a token.

Transient faults are injected at the filesystem boundary: `FlakyFS` is a real fsspec filesystem
(memory:// underneath) registered for the `rabbitflaky://` protocol, whose `cat_ranges` /
`cat_file` raise the errors real backends raise (a reset connection; s3fs's EBUSY for an HTTP 503
SlowDown; aiohttp's ClientResponseError 503 from fsspec's HTTP backend; a timeout) on the calls
the test picks. The hub is a real HTTP server on 127.0.0.1 (HF_ENDPOINT) answering as the hub does
for a gated repo.
"""

from __future__ import annotations

import errno
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import rabbit_store.sources.retry as retry
from rabbit_store import CheckpointIndex, LayerPlan, LayerReader, open_source, split_checkpoint
from rabbit_store.errors import AccessDeniedError, CheckpointNotFoundError, StorageError
from tests.store.store_helpers import (
    Checkpoint,
    model_tensors,
    odd_shards,
    upload,
    write_checkpoint,
)

from .conftest import assert_one_line_error, cli_env, digests, snapshot, store_cli


def http_503() -> Exception:
    import aiohttp
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    url = URL("https://models.example/model/weights-a.safetensors")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=503, message="Service Unavailable")


TRANSIENT = {
    "connection reset": lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "s3 503 SlowDown": lambda: OSError(errno.EBUSY, "Please reduce your request rate."),
    "http 503": http_503,
    "timeout": lambda: TimeoutError("read timed out"),
}


class FlakyFS(MemoryFileSystem):
    """memory:// whose reads fail as told: `plan` holds the errors of the next read calls (None:
    that call succeeds); `every` > 0 makes every n-th call fail with a connection reset."""

    protocol = ("rabbitflaky",)
    cachable = False
    plan: list[Exception | None] = []
    every = 0
    forever: Exception | None = None
    calls = 0
    _nested = threading.local()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("rabbitflaky://"))

    def _maybe_fail(self) -> None:
        cls = type(self)
        cls.calls += 1
        if cls.forever is not None:
            raise cls.forever
        if cls.plan:
            error = cls.plan.pop(0)
            if error is not None:
                raise error
        elif cls.every and cls.calls % cls.every == 0:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    def cat_ranges(self, paths, starts, ends, **kwargs):
        self._maybe_fail()
        self._nested.on = True  # the base class serves the batch through cat_file
        try:
            return super().cat_ranges(paths, starts, ends, **kwargs)
        finally:
            self._nested.on = False

    def cat_file(self, path, start=None, end=None, **kwargs):
        if not getattr(self._nested, "on", False):
            self._maybe_fail()
        return super().cat_file(path, start, end, **kwargs)


@pytest.fixture
def flaky(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[str, Checkpoint]]:
    fsspec.register_implementation("rabbitflaky", FlakyFS, clobber=True)
    # keep the test fast; the schedule is the same
    monkeypatch.setattr(retry, "RETRY_BASE_DELAY", 0.01)
    tensors = model_tensors(num_layers=4)
    checkpoint = write_checkpoint(tmp_path / "src", tensors, odd_shards(tensors))
    root = f"/flaky-{abs(hash(request.node.nodeid))}"
    upload(MemoryFileSystem(), checkpoint.path, root)
    FlakyFS.plan, FlakyFS.every, FlakyFS.forever, FlakyFS.calls = [], 0, None, 0
    yield f"rabbitflaky://{root}", checkpoint
    FlakyFS.plan, FlakyFS.every, FlakyFS.forever = [], 0, None
    MemoryFileSystem().rm(root, recursive=True)


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "retrying in" in r.getMessage()
    ]


@pytest.mark.parametrize("kind", sorted(TRANSIENT))
def test_transient_read_failures_are_retried_with_backoff(
    flaky, kind: str, caplog: pytest.LogCaptureFixture
):
    url, checkpoint = flaky
    source = open_source(url)
    make = TRANSIENT[kind]
    FlakyFS.plan = [make(), make()]  # the header reads fail twice, then succeed
    with caplog.at_level("WARNING", logger="rabbit_store"):
        index = CheckpointIndex.load(source)
        plan = LayerPlan.from_index(index)
        FlakyFS.plan = [make(), make(), make()]  # and the layer read three times
        views = LayerReader(source, index).read(plan.layers[1])
    assert {n: bytes(v) for n, v in views.items()} == {
        n: checkpoint.tensors[n].tobytes() for n in views
    }
    warned = retry_warnings(caplog)
    assert len(warned) == 5, warned
    assert all(
        url in w and re.search(r"model\.safetensors\.index\.json|weights-a\.safetensors", w)
        for w in warned
    )
    delays = [float(re.search(r"retrying in ([0-9.]+) s", w).group(1)) for w in warned]
    # exponential with jitter: retry k waits 0.01 * 2**(k-1) * [0.5, 1.5)
    for k, delay in zip([1, 2, 1, 2, 3], delays, strict=True):
        assert 0.005 * 2 ** (k - 1) - 0.0005 <= delay <= 0.015 * 2 ** (k - 1) + 0.0005, (
            k,
            delay,
        )  # logged to 1 ms
    assert "attempt 2 of 5" in warned[0] and "attempt 4 of 5" in warned[4]


def test_a_split_from_a_flaky_store_is_identical(
    flaky, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    url, checkpoint = flaky
    split_checkpoint(checkpoint.path, tmp_path / "reference", progress=False)
    FlakyFS.every = 3  # every third read call resets the connection, all through the split
    with caplog.at_level("WARNING", logger="rabbit_store"):
        split_checkpoint(url, tmp_path / "dest", progress=False)
    assert retry_warnings(caplog)
    got, expected = digests(tmp_path / "dest"), digests(tmp_path / "reference")
    assert got.pop("rabbit-split.json") != expected.pop("rabbit-split.json")  # names its source
    assert got == expected


def test_a_persistent_failure_gives_up_and_names_the_file(flaky, caplog: pytest.LogCaptureFixture):
    url, _ = flaky
    source = open_source(url)
    index = CheckpointIndex.load(source)
    FlakyFS.forever, FlakyFS.calls = (
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        0,
    )
    with caplog.at_level("WARNING", logger="rabbit_store"), pytest.raises(StorageError) as err:
        LayerReader(source, index).read(LayerPlan.from_index(index).layers[3])
    assert FlakyFS.calls == retry.READ_ATTEMPTS == 5
    message = str(err.value)
    assert url in message and "part_7.bin.safetensors" in message
    assert "after 5 attempts" in message and "ConnectionResetError" in message
    assert len(retry_warnings(caplog)) == 4


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (PermissionError(errno.EACCES, "Access Denied"), AccessDeniedError),
        (FileNotFoundError(errno.ENOENT, "NoSuchKey"), CheckpointNotFoundError),
        (OSError(errno.EINVAL, "InvalidRange"), StorageError),
    ],
    ids=["access denied", "not found", "invalid"],
)
def test_permanent_failures_are_not_retried(
    flaky, error: Exception, expected: type, caplog: pytest.LogCaptureFixture
):
    url, _ = flaky
    source = open_source(url)
    FlakyFS.forever, FlakyFS.calls = error, 0
    with (
        caplog.at_level("WARNING", logger="rabbit_store"),
        pytest.raises(expected, match=r"model\.safetensors\.index\.json"),
    ):
        CheckpointIndex.load(source)
    assert FlakyFS.calls == 1 and retry_warnings(caplog) == []


# ---- S3 (moto) -----------------------------------------------------------------------------------
def test_s3_wrong_bucket(s3, sharded_small: Path):
    url = "s3://no-such-bucket-rabbit/model"
    with pytest.raises(CheckpointNotFoundError) as err:
        open_source(url, storage_options=s3["options"])
    assert url in str(err.value) and "check the location" in str(err.value)
    result = store_cli(
        "inspect",
        url,
        "--storage-option",
        f"endpoint_url={s3['options']['endpoint_url']}",
        env=cli_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"),
    )
    assert_one_line_error(result, url, "no such directory")


def test_s3_without_credentials(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import s3fs

    for key in [k for k in __import__("os").environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    url = "s3://some-bucket/model"
    with pytest.raises(AccessDeniedError) as err:
        open_source(url, storage_options={"endpoint_url": s3_server})
    message = str(err.value)
    assert (
        url in message
        and "no credentials" in message
        and "AWS_ACCESS_KEY_ID" in message
        and "anon=True" in message
    )
    env = cli_env(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
    )
    result = store_cli("inspect", url, "--storage-option", f"endpoint_url={s3_server}", env=env)
    assert_one_line_error(result, url, "no credentials")
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def sharded_small(tmp_path: Path) -> Path:
    tensors = model_tensors(num_layers=2)
    return write_checkpoint(tmp_path / "small", tensors).path


# ---- a gated hub repo ----------------------------------------------------------------------------
class GatedHub:
    """An HTTP server answering every request as the hub does for a gated repo (401 + headers)."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _gated(self) -> None:
                hub.authorizations.append(self.headers.get("Authorization"))
                body = b'{"error": "Access to model rabbit-org/gated is restricted."}'
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", "GatedRepo")
                self.send_header(
                    "X-Error-Message",
                    "Access to model rabbit-org/gated is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in.",
                )
                self.send_header("X-Request-Id", "Root=1-rabbit-test")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _gated

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GatedHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gated_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[GatedHub]:
    from huggingface_hub import constants

    with GatedHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login
        yield hub


def test_gated_repo_without_a_token_says_how_to_pass_one(gated_hub: GatedHub, tmp_path: Path):
    before = snapshot(tmp_path)
    with pytest.raises(AccessDeniedError) as err:
        open_source("rabbit-org/gated")
    message = str(err.value)
    assert "rabbit-org/gated is gated" in message and "token=" in message and "HF_TOKEN" in message
    assert "accept its terms" in message
    assert (
        gated_hub.authorizations and gated_hub.authorizations[0] is None
    )  # really asked, without a token
    assert snapshot(tmp_path) == before
    result = store_cli(
        "inspect",
        "rabbit-org/gated",
        env=cli_env(
            HF_ENDPOINT=gated_hub.url,
            HF_HUB_OFFLINE="0",
            HF_HUB_CACHE=str(tmp_path / "hub-cache"),
            HF_HOME=str(tmp_path / "hf-home"),
        ),
    )
    assert_one_line_error(result, "rabbit-org/gated is gated", "--token", "HF_TOKEN")
