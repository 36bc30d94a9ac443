"""`rabbit_engine` imports its submodules on use: torch-free ones stay torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_cgroup_imports_without_torch():
    modules = _imported("import rabbit_engine.cgroup")
    assert "rabbit_engine.cgroup" in modules
    assert "torch" not in modules and "transformers" not in modules


def test_package_names_resolve_on_use():
    import rabbit_engine

    for name in rabbit_engine.__all__:
        assert getattr(rabbit_engine, name) is not None
    assert "torch" in _imported("from rabbit_engine import load_streaming_model")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rabbit_engine.nope  # noqa: B018
