from __future__ import annotations

import pytest
import torch

from tests.models.families import build_model, save_checkpoint


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    """A tiny random Llama saved sharded, with its in-memory reference model."""
    ref = build_model("llama", dtype=torch.float32, seed=0)
    path = save_checkpoint(ref, tmp_path_factory.mktemp("llama") / "ckpt", sharded=True)
    return ref, path
