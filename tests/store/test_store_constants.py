"""rabbit_store.constants: environment parsing, cache paths, and one home for each shared fact."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from rabbit_store import constants
from rabbit_store.constants import cache_root, env_flag, remote_cache_dir

PACKAGES = Path(__file__).resolve().parents[2] / "packages"


@pytest.mark.parametrize("value", ["1", "on", "ON", "Yes", "true", "TRUE", " 1 ", "True\n"])
def test_env_flag_true(value: str):
    assert env_flag("X", {"X": value})


@pytest.mark.parametrize("value", ["", "0", "off", "no", "false", "2", "y", "enabled"])
def test_env_flag_false(value: str):
    assert not env_flag("X", {"X": value})


def test_env_flag_reads_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(constants.HF_HUB_OFFLINE_ENV, raising=False)
    assert not env_flag(constants.HF_HUB_OFFLINE_ENV)
    monkeypatch.setenv(constants.HF_HUB_OFFLINE_ENV, "yes")
    assert env_flag(constants.HF_HUB_OFFLINE_ENV)


def test_hub_offline_uses_the_same_parsing(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    from rabbit_store.sources.hub import hub_offline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "On")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()


def test_cache_root_precedence_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("RABBITLLM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path(os.path.expanduser("~")) / ".cache" / "rabbitllm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "rabbitllm"
    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    assert remote_cache_dir() == tmp_path / "explicit" / "remote"
    monkeypatch.setenv("RABBITLLM_CACHE", "~/rabbit-cache")
    assert cache_root() == Path(os.path.expanduser("~")) / "rabbit-cache"


def test_remote_block_cache_lives_under_the_cache_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    from rabbit_store.sources import default_remote_cache_dir

    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "c"))
    assert default_remote_cache_dir() == str(tmp_path / "c" / "remote")


def test_suffix_groups():
    assert set(constants.PICKLE_SUFFIXES) <= set(constants.NON_SAFETENSORS_WEIGHT_SUFFIXES)
    assert constants.SAFETENSORS_SUFFIX not in constants.NON_SAFETENSORS_WEIGHT_SUFFIXES
    assert constants.SINGLE_FILE.endswith(constants.SAFETENSORS_SUFFIX)


def _module_level_names(path: Path) -> set[str]:
    """Names a module assigns at its top level (imports, which re-export, are not counted)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        names.update(t.id for t in targets if isinstance(t, ast.Name))
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def test_every_constant_is_defined_only_in_rabbit_store_constants():
    """One home per fact: no other module of any package defines a name constants.py owns
    (e.g. HASH_CHUNK, PICKLE_SUFFIXES, CACHE_ENV, cache_root); they import it."""
    owned = _module_level_names(Path(constants.__file__))
    assert {"HASH_CHUNK", "PICKLE_SUFFIXES", "CACHE_ENV", "cache_root", "env_flag"} <= owned
    home = Path(constants.__file__).resolve()
    twice = {
        f"{path.relative_to(PACKAGES)}: {name}"
        for path in PACKAGES.glob("*/src/**/*.py")
        if path.resolve() != home
        for name in _module_level_names(path) & owned
    }
    assert not twice, sorted(twice)


def test_the_facade_uses_the_store_cache_root():
    from rabbitllm import default_model

    assert default_model.cache_root is constants.cache_root
