"""A local Ray cluster shared by the module's tests, and the tiny model of tests/serve.

The cluster: `ray.init(num_cpus=2)` in this process, started once for the module (a start costs
seconds on a busy 2-core machine) and shut down after. Its workers inherit this process's
environment as it is at `ray.init`, so what they need is set just for that call: the checkout on
PYTHONPATH (they import the tests' own predictor subclasses), the hub offline, and a private
RabbitLLM cache (the block cache of the model read from S3).

The model: tests/serve's 2-layer random Llama with SmolLM2's tokenizer (a step costs milliseconds,
prompts and chat templates are the real default model's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.conftest import tiny_model_dir  # noqa: F401  (the fixture, shared)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[Path]:
    """A running local cluster (2 CPUs); yields the RabbitLLM cache directory its workers use.

    The environment is changed only around `ray.init`: the cluster's processes keep what they
    started with, and the tests that run after these keep the session's own."""
    ray = pytest.importorskip("ray")
    cache = tmp_path_factory.mktemp("ray-rabbit-cache")
    saved = dict(os.environ)
    os.environ.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RABBITLLM_CACHE=str(cache),
    )
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            configure_logging=False,
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield cache
    finally:
        ray.shutdown()
