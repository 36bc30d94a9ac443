"""The opener registry: backends by scheme, imported on first use; unknown schemes refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rabbit_store import open_source, register_opener
from rabbit_store.errors import InvalidOptionError, MissingDependencyError, UnknownSchemeError
from rabbit_store.sources import FsspecSource, registry, scheme_of

from .store_helpers import Checkpoint


def run_python(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_hub_backend_is_imported_only_when_a_hub_repo_is_opened(sharded: Checkpoint, tmp_path):
    out = run_python(
        f"""
        import sys
        from rabbit_store import open_source
        from rabbit_store.errors import CheckpointNotFoundError
        open_source({str(sharded.path)!r})
        open_source("memory://")
        print("rabbit_store.sources.hub" in sys.modules, "huggingface_hub" in sys.modules)
        try:
            open_source("rabbit-org/not-cached")
        except CheckpointNotFoundError:
            pass
        print("rabbit_store.sources.hub" in sys.modules, "huggingface_hub" in sys.modules)
        """,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "empty-hub-cache"),
    )
    assert out.splitlines() == ["False False", "True True"]


def test_dotted_path_opener_is_imported_on_first_use(
    sharded: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "lazy_backend_for_test.py").write_text(
        "from rabbit_store import open_source\n"
        f"def open_it(location, **options):\n    return open_source({str(sharded.path)!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._OPENERS, "lazytest", "lazy_backend_for_test:open_it")
    assert "lazy_backend_for_test" not in sys.modules
    try:
        source = open_source("lazytest://anything")
        assert source.location == str(sharded.path)
        assert "lazy_backend_for_test" in sys.modules
        # imported once: the table now holds the function itself
        assert registry._OPENERS["lazytest"] is sys.modules["lazy_backend_for_test"].open_it
    finally:
        sys.modules.pop("lazy_backend_for_test", None)


def test_unknown_scheme_names_the_url_and_the_fix():
    with pytest.raises(UnknownSchemeError) as err:
        open_source("nosuchscheme://user:secret@bucket/model")
    message = str(err.value)
    assert "nosuchscheme://bucket/model" in message  # the URL, without its credentials
    assert "secret" not in message
    assert "register_opener('nosuchscheme'" in message and "hf" in message
    assert isinstance(err.value, InvalidOptionError)  # callers catching the old error still do


def test_opener_that_cannot_be_imported_is_a_missing_dependency(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setitem(registry._OPENERS, "brokentest", "no_such_module_here:open_it")
    with pytest.raises(MissingDependencyError, match="brokentest.*no_such_module_here"):
        open_source("brokentest://x")


def test_fsspec_schemes_without_an_entry_go_to_fsspec():
    assert "memory" not in registry._OPENERS
    assert isinstance(open_source("memory://"), FsspecSource)


def test_register_opener_by_callable_and_case(sharded: Checkpoint, monkeypatch):
    monkeypatch.setattr(registry, "_OPENERS", dict(registry._OPENERS))  # restored afterwards
    register_opener("RabbitCase", lambda location, **options: open_source(str(sharded.path)))
    assert open_source("rabbitcase://x").location == str(sharded.path)
    assert open_source("RABBITCASE://x").location == str(sharded.path)


@pytest.mark.parametrize(
    ("location", "scheme"),
    [
        ("s3://bucket/x", "s3"),
        ("HF://org/name", "hf"),
        ("blockcache::s3://bucket/x", registry.CHAINED),
        ("org/name", "hf"),
        ("/definitely/not/here", registry.LOCAL),
        ("relative/dir/that/is/deep", registry.LOCAL),
    ],
)
def test_scheme_of(location: str, scheme: str):
    assert scheme_of(location) == scheme


def test_existing_local_org_name_directory_is_local(tmp_path: Path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert scheme_of("org/name") == registry.LOCAL
