"""LayerReader: zero-copy local views, caller buffers, coalesced remote reads, spans and advice."""

from __future__ import annotations

import mmap

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from rabbit_store import CheckpointIndex, LayerPlan, LayerReader, open_source
from rabbit_store.errors import InvalidOptionError
from rabbit_store.reader import coalesce, packed_layout

from .store_helpers import Checkpoint, upload


def open_all(location: str, **options):
    source = open_source(location, **options)
    index = CheckpointIndex.load(source)
    return source, index, LayerPlan.from_index(index), LayerReader(source, index)


def assert_bytes(views, tensors):
    assert {n: bytes(v) for n, v in views.items()} == {n: tensors[n].tobytes() for n in views}


def test_local_views_are_zero_copy_and_writable(sharded: Checkpoint):
    _, _, plan, reader = open_all(str(sharded.path))
    with reader:
        views = reader.read(plan.layers[1])  # layer 1 spans two non-consecutive shards
        assert list(views) == plan.layers[1]
        assert_bytes(views, sharded.tensors)
        for view in views.values():
            assert isinstance(view.obj, mmap.mmap) and not view.readonly
        name = plan.layers[1][0]
        views[name][0] ^= 0xFF  # private copy-on-write: the file is untouched
        assert (sharded.path / "weights-a.safetensors").read_bytes().count(
            sharded.tensors[name].tobytes()
        ) == 1
        again = reader.read([name])
        assert (
            bytes(again[name]) != sharded.tensors[name].tobytes()
        )  # same private map for the reader's life


def test_read_into_caller_buffer(sharded: Checkpoint):
    _, _, plan, reader = open_all(str(sharded.path))
    names = plan.layers[2]
    buffer = bytearray(plan.nbytes(names) + 5)
    views = reader.read(names, out=buffer)
    assert_bytes(views, sharded.tensors)
    for view in views.values():
        assert view.obj is buffer
    offsets, total = packed_layout([reader.index.tensors[n] for n in names])
    assert total == plan.nbytes(names)
    # widest dtype first: every tensor naturally aligned in the buffer
    for name, offset in offsets.items():
        assert offset % reader.index.tensors[name].alignment == 0
    with pytest.raises(InvalidOptionError, match="tensors need 757"):
        reader.read(names, out=bytearray(3))
    with pytest.raises(InvalidOptionError, match="writable"):
        reader.read(names, out=bytes(total))
    with pytest.raises(InvalidOptionError, match="'nope'"):
        reader.read(["nope"])
    reader.close()


def test_advise_spans_and_file_kinds_local(sharded: Checkpoint):
    _, index, plan, reader = open_all(str(sharded.path))
    reader.advise(plan.layers[3])  # nothing mapped yet: left to the read that maps the file
    assert_bytes(reader.read(plan.layers[3]), sharded.tensors)
    reader.advise(plan.layers[3])  # mapped: madvise(WILLNEED), the bytes are what they were
    assert_bytes(reader.read(plan.layers[3]), sharded.tensors)
    spans = reader.spans(plan.layers[1])  # layer 1 spans two non-consecutive shards
    assert {s.file for s in spans} == {"weights-a.safetensors", "zz/last.safetensors"}
    for span in spans:
        infos = [index.tensors[n] for n in plan.layers[1]]
        mine = [i for i in infos if i.file == span.file and i.nbytes]
        assert (span.start, span.end) == (min(i.offset for i in mine), max(i.end for i in mine))
    assert reader.is_local("zz/last.safetensors")
    assert reader.local_path("zz/last.safetensors") == str(sharded.path / "zz" / "last.safetensors")
    reader.close()


def test_coalesce_merges_neighbours_and_cuts_parts(sharded: Checkpoint):
    index = CheckpointIndex.load(open_source(str(sharded.path)))
    infos = [index.tensors[n] for n in LayerPlan.from_index(index).layers[1]]
    reads = coalesce(infos)
    assert {r[0] for r in reads} == {"weights-a.safetensors", "zz/last.safetensors"}
    assert len(reads) == 2  # one read per shard
    assert coalesce(infos, gap=0, part=64) != reads and all(
        e - s <= 64 for _, s, e in coalesce(infos, gap=0, part=64)
    )


class CountingMemoryFS(MemoryFileSystem):
    """memory:// that records the ranges asked of cat_ranges."""

    protocol = ("countmem",)
    calls: list[list[tuple[str, int, int]]] = []

    def cat_ranges(self, paths, starts, ends, **kwargs):
        self.calls.append(list(zip(paths, starts, ends, strict=True)))
        return super().cat_ranges(paths, starts, ends, **kwargs)


def test_remote_reads_are_coalesced_and_writable(sharded: Checkpoint):
    fs = CountingMemoryFS()
    upload(fs, sharded.path, "/ckpt")
    from rabbit_store import FsspecSource

    source = FsspecSource(fs, "/ckpt")
    index = CheckpointIndex.load(source)
    plan = LayerPlan.from_index(index)
    reader = LayerReader(source, index)
    fs.calls.clear()
    views = reader.read(plan.layers[1])
    assert_bytes(views, sharded.tensors)
    assert len(fs.calls) == 1 and len(fs.calls[0]) == 2  # one batched call, one range per shard
    assert all(not v.readonly for v in views.values())
    buffer = bytearray(plan.nbytes(plan.layers[0]))
    assert_bytes(reader.read(plan.layers[0], out=buffer), sharded.tensors)

    fs.calls.clear()
    reader.advise(plan.layers[2])  # remote: nothing to advise, and nothing read in the background
    assert fs.calls == []
    assert (
        not reader.is_local("weights-a.safetensors")
        and reader.mapping("weights-a.safetensors") is None
    )
    reader.close()


def test_memory_url_source(sharded: Checkpoint):
    fs = fsspec.filesystem("memory")
    upload(fs, sharded.path, "/rabbit-reader")
    _, _, plan, reader = open_all("memory://rabbit-reader")
    assert reader.source.local_path("weights-a.safetensors") is None
    assert_bytes(reader.read(plan.layers[1]), sharded.tensors)
