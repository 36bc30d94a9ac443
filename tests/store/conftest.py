"""Fixtures of the rabbit-store tests: checkpoints, a moto S3 server with a bucket per test."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .store_helpers import Checkpoint, model_tensors, odd_shards, write_checkpoint


@pytest.fixture
def sharded(tmp_path: Path) -> Checkpoint:
    tensors = model_tensors(num_layers=4)
    return write_checkpoint(tmp_path / "sharded", tensors, odd_shards(tensors))


@pytest.fixture
def single(tmp_path: Path) -> Checkpoint:
    return write_checkpoint(tmp_path / "single", model_tensors(tied=True))


# -- S3 (moto server) -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[dict]:
    """storage_options for the moto server and a fresh bucket named after the test."""
    import s3fs

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    options = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    bucket = "b-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    fs.mkdir(bucket)
    yield {"options": options, "fs": fs, "bucket": bucket}
    s3fs.S3FileSystem.clear_instance_cache()
