"""Fixtures shared by several test packages: a moto S3 server (one per session) and a fresh bucket
per test, reached through s3fs with plain storage_options."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Tiny test models gain nothing from intra-op threads, and OpenMP's spin-waiting threads turn a
    # busy 2-core machine (CI, parallel jobs) into 50x slower matmuls. Both sides of every parity
    # comparison run in this process, so they share the setting.
    try:
        import torch
    except ImportError:  # the store's own tests need no torch
        return
    torch.set_num_threads(1)


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
def s3(
    s3_server: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[dict]:
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


@pytest.fixture
def isolated_logging():
    """main() installs its own root handler; give the root logger back to pytest afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
