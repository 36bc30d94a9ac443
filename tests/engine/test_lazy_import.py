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


@pytest.mark.parametrize(
    ("code", "module"),
    [
        ("import rabbit_engine.cgroup", "rabbit_engine.cgroup"),
        # the CLI builds its flags from the options before deciding to load a model
        (
            "import rabbit_engine.options as o; assert o.DEFAULT_PREFETCH >= 0 "
            "and 'sdpa' in o.ATTN_CHOICES",
            "rabbit_engine.options",
        ),
        # a bad compression= or a manifest's scheme is handled before torch is imported
        (
            "from rabbit_engine.quant import parse_compression; parse_compression('4bit')",
            "rabbit_store.compression",
        ),
    ],
    ids=["cgroup", "options", "quant-scheme"],
)
def test_torch_free_modules_import_without_torch(code, module):
    modules = _imported(code)
    assert module in modules
    assert "torch" not in modules and "transformers" not in modules


def test_package_names_resolve_on_use():
    import rabbit_engine

    for name in rabbit_engine.__all__:
        assert getattr(rabbit_engine, name) is not None
    assert "torch" in _imported("from rabbit_engine import load_streaming_model")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rabbit_engine.nope  # noqa: B018
