"""rabbit-store CLI end to end, in subprocesses (as a user runs it)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rabbit_store.cli import add_subcommands, main, parse_storage_options
from rabbit_store.errors import InvalidOptionError

from .store_helpers import Checkpoint


def rabbit_store(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbit_store.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_split_verify_end_to_end(sharded: Checkpoint, tmp_path: Path):
    shown = rabbit_store("inspect", str(sharded.path))
    assert shown.returncode == 0, shown.stderr
    assert "layers: 4 under 'model.layers'; tied head: no" in shown.stdout
    assert (
        "layer 1:" in shown.stdout and "weights-a.safetensors, zz/last.safetensors" in shown.stdout
    )

    as_json = json.loads(rabbit_store("inspect", str(sharded.path), "--json").stdout)
    assert as_json["num_layers"] == 4 and as_json["tied"] is False
    assert as_json["num_tensors"] == len(sharded.tensors)
    assert as_json["dtypes"] == {"F32": 11, "F16": 12, "I8": 4}
    assert as_json["total_bytes"] == sum(a.nbytes for a in sharded.tensors.values())

    dest = tmp_path / "split"
    done = rabbit_store("split", str(sharded.path), str(dest), "--quiet")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    checked = rabbit_store("verify", str(dest))
    assert checked.returncode == 0 and "files OK" in checked.stdout

    victim = dest / "layer-00003.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = rabbit_store("verify", str(dest))
    assert bad.returncode == 1
    assert "CORRUPTED layer-00003.safetensors: sha256" in bad.stderr


def test_user_errors_exit_2_with_one_line(tmp_path: Path):
    missing = rabbit_store("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "is not a directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    debug = rabbit_store("--debug", "inspect", str(tmp_path / "nope"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    no_split = rabbit_store("verify", str(tmp_path))
    assert no_split.returncode == 2 and "rabbit-split.json" in no_split.stderr
    bad_option = rabbit_store("inspect", str(tmp_path), "--storage-option", "novalue")
    assert bad_option.returncode == 2 and "key=value" in bad_option.stderr


def test_split_progress_and_summary(
    single: Checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["split", str(single.path), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "3 layers" in captured.out and "split" in captured.err  # tqdm bar on stderr


def test_storage_options_parsing():
    assert parse_storage_options(None) is None
    assert parse_storage_options(
        ["endpoint_url=http://h:9000", "anon=true", "client_kwargs.region_name=eu", "n=3"]
    ) == {
        "endpoint_url": "http://h:9000",
        "anon": True,
        "client_kwargs": {"region_name": "eu"},
        "n": 3,
    }
    with pytest.raises(InvalidOptionError):
        parse_storage_options(["=x"])


def test_subcommands_mount_on_another_parser():
    parser = argparse.ArgumentParser(prog="rabbit")
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["split", "a", "b", "--delete-original", "--storage-option", "k=v"])
    assert (
        args.func.__name__ == "cmd_split"
        and args.delete_original
        and args.storage_option == ["k=v"]
    )
