"""No code runs from a checkpoint unless the user says so."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from rabbit_engine.errors import PickleRefusedError, UnsupportedModelError
from rabbit_store.errors import InvalidCheckpointError
from rabbitllm import AutoModel


@pytest.fixture
def pickle_checkpoint(tmp_path, llama_checkpoint, monkeypatch):
    ref, _ = llama_checkpoint
    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "pickled"
    ref.config.save_pretrained(path)
    torch.save(ref.state_dict(), path / "pytorch_model.bin")
    return ref, path


def test_pickle_refused_by_default_with_a_way_out(pickle_checkpoint):
    _, path = pickle_checkpoint
    with pytest.raises(PickleRefusedError) as err:
        AutoModel.from_pretrained(path)
    message = str(err.value)
    assert (
        "pytorch_model.bin" in message
        and "allow_pickle=True" in message
        and "save_pretrained" in message
    )


def test_pickle_allowed_is_converted_once_and_exact(pickle_checkpoint, tmp_path):
    ref, path = pickle_checkpoint
    ids = torch.randint(3, 200, (1, 11))
    with AutoModel.from_pretrained(path, allow_pickle=True) as model, torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert [p.name for p in converted if not p.name.endswith(".lock")] and all(
        not p.name.endswith(".incomplete") for p in converted
    )


def test_tied_pickle_converts_to_one_tensor_and_loads_tied(tmp_path, monkeypatch):
    """A tied head is one tensor under two names: written once (as safetensors' save_model does),
    not cloned into a second copy that would be read and held twice."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "cache"))
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).eval()
    state = ref.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    path = tmp_path / "tied"
    config.save_pretrained(path)
    torch.save(state, path / "pytorch_model.bin")
    ids = torch.randint(3, 200, (1, 9))
    with AutoModel.from_pretrained(path, allow_pickle=True) as model, torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    (converted,) = (tmp_path / "cache" / "converted").glob("*/pytorch_model.safetensors")
    with safe_open(str(converted), "pt") as f:
        names = set(f.keys())
        assert f.metadata()["lm_head.weight"] == "model.embed_tokens.weight"
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path, llama_checkpoint, monkeypatch):
    ref, _ = llama_checkpoint
    marker = tmp_path / "pwned"
    monkeypatch.setattr(_Exploit, "marker", str(marker), raising=False)
    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "evil"
    ref.config.save_pretrained(path)
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Exploit()}, f)
    with pytest.raises(InvalidCheckpointError, match="weights_only=True"):
        AutoModel.from_pretrained(path, allow_pickle=True)
    assert not marker.exists()


def test_remote_code_needs_the_flag(tmp_path, llama_checkpoint):
    _, ckpt = llama_checkpoint
    path = tmp_path / "custom"
    path.mkdir()
    for f in ckpt.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="my_custom_llm", auto_map={"AutoConfig": "configuration_custom.CustomConfig"}
    )
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="trust_remote_code=True"):
        AutoModel.from_pretrained(path)
