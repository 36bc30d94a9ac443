"""open_source: backends by scheme, local paths, option checks, safe names."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbit_store import FsspecSource, open_source, register_opener
from rabbit_store.errors import CheckpointNotFoundError, InvalidCheckpointError, InvalidOptionError
from rabbit_store.sources import registry, relative_name

from .store_helpers import Checkpoint


def test_local_directory(sharded: Checkpoint):
    source = open_source(sharded.path)  # PathLike accepted
    assert isinstance(source, FsspecSource)
    assert source.location == str(sharded.path)
    assert source.local_path("zz/last.safetensors") == str(sharded.path / "zz" / "last.safetensors")
    assert "zz/last.safetensors" in source.list_files() and "config.json" in source.list_files()
    assert (
        source.exists("config.json") and not source.exists("nope.json") and not source.exists("zz")
    )
    assert source.size("config.json") == (sharded.path / "config.json").stat().st_size
    assert source.read_json("config.json")["model_type"] == "llama"
    assert source.cat_ranges(["config.json", "config.json"], [0, 2], [1, 4]) == [b"{", b"mo"]
    assert open_source(source) is source


def test_file_url(sharded: Checkpoint):
    source = open_source(f"file://{sharded.path}")
    assert source.local_path("config.json") == f"{sharded.path}/config.json"


def test_missing_local_directory(tmp_path: Path):
    with pytest.raises(CheckpointNotFoundError, match="is not a directory"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(CheckpointNotFoundError, match="no such directory"):
        open_source("memory://definitely/not/here")


def test_revision_is_for_hub_only(sharded: Checkpoint):
    with pytest.raises(InvalidOptionError, match="hub repos only"):
        open_source(str(sharded.path), revision="main")
    with pytest.raises(InvalidOptionError, match="hub repos only"):
        open_source("memory://x", revision="main")


def test_bad_json(sharded: Checkpoint):
    (sharded.path / "config.json").write_text("[1, 2]")
    with pytest.raises(InvalidCheckpointError, match="config.json holds a JSON list"):
        open_source(str(sharded.path)).read_json("config.json")


def test_bare_repo_id_goes_to_the_hub_opener(monkeypatch: pytest.MonkeyPatch):
    seen = {}
    monkeypatch.setitem(
        registry._OPENERS,
        "hf",
        lambda location, **options: seen.setdefault("hf", (location, options)),
    )
    open_source("org/name", revision="v1", token="hf_secret")
    assert seen["hf"][0] == "org/name" and seen["hf"][1]["revision"] == "v1"


def test_register_opener(sharded: Checkpoint, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry, "_OPENERS", dict(registry._OPENERS))  # restored afterwards
    register_opener("rabbittest", lambda location, **options: open_source(str(sharded.path)))
    assert open_source("rabbittest://anything").location == str(sharded.path)


def test_credentials_not_shown_in_location():
    source = open_source("memory://")  # root of the memory filesystem always exists
    assert source.location == "memory://"
    from rabbit_store.sources import display_url

    assert display_url("s3://user:pass@bucket/x") == "s3://bucket/x"


@pytest.mark.parametrize("name", ["../x", "/abs", "C:/x", "s3://b/x", "a\\b", "", "a/../../b", "."])
def test_relative_name_refuses_escapes(name: str):
    with pytest.raises(InvalidCheckpointError):
        relative_name(name)


def test_relative_name_normalises():
    assert relative_name("./a//b.safetensors") == "a/b.safetensors"
