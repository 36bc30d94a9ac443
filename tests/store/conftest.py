"""Fixtures of the rabbit-store tests: small checkpoints.

(The moto S3 fixtures are in tests/conftest.py.)
"""

from __future__ import annotations

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
