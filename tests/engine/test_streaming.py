"""Behaviour of the streaming loop itself: a real KV cache, bounded weight residency, the budget."""

from __future__ import annotations

import pytest
import torch

from rabbit_engine.errors import MemoryBudgetError
from rabbitllm import AutoModel


def _layers(model):
    return model._rabbit_streamer.weight_map.model.model.layers


def test_decode_steps_run_layers_on_one_new_token(llama_checkpoint):
    ref, path = llama_checkpoint
    ids = torch.randint(3, 200, (1, 17))
    seen: list[int] = []
    with AutoModel.from_pretrained(path) as model:
        hook = _layers(model)[0].register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(
                kwargs.get("hidden_states", args[0] if args else None).shape[1]
            ),
            with_kwargs=True,
        )
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        hook.remove()
    assert seen == [17, 1, 1, 1, 1, 1], seen


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_at_most_prefetch_plus_one_layers_hold_weights(llama_checkpoint, prefetch):
    ref, path = llama_checkpoint
    counts: list[int] = []
    with AutoModel.from_pretrained(path, prefetch=prefetch) as model:
        layers = _layers(model)

        def count(mod, args):
            counts.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))

        hooks = [layer.register_forward_pre_hook(count) for layer in layers]
        model.generate(
            torch.randint(3, 200, (1, 9)), max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        for h in hooks:
            h.remove()
        # Hooks registered after the streamer's run after its loader: the running layer is the only
        # one with real weights in a module; prefetched ones wait as tensors in the pipeline.
        assert counts and max(counts) == 1
        assert model.streamer_stats["max_loaded_layers"] <= 1 + prefetch
        assert all(p.is_meta for layer in layers for p in layer.parameters())


def test_budget_keeps_layers_resident_and_rejects_too_small(llama_checkpoint):
    ref, path = llama_checkpoint
    ids = torch.randint(3, 200, (1, 9))
    expected = ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with AutoModel.from_pretrained(path, max_memory="1GiB") as model:
        assert model.streamer_stats["resident_layers"] == list(range(ref.config.num_hidden_layers))
        assert torch.equal(
            model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected
        )
    with pytest.raises(MemoryBudgetError, match="at least"):
        AutoModel.from_pretrained(path, max_memory=1000)


def test_partial_residency_reads_every_streamed_layer_ahead(tmp_path):
    """With the first layers resident, the layer after the last one is the first *streamed* one:
    it must be read ahead like any other, not loaded by the compute thread when its turn comes."""
    from transformers import AutoModelForCausalLM

    from rabbit_engine.weights import RESIDENT
    from tests.models.families import FAMILIES

    config = FAMILIES["llama"].make_config()
    config.num_hidden_layers = 8  # more than the budget below can hold
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt"
    with AutoModel.from_pretrained(path, dtype=torch.bfloat16) as probe:
        wm = probe._rabbit_streamer.weight_map
        fixed, layer = wm.loaded_nbytes(RESIDENT), max(wm.loaded_nbytes(i) for i in range(8))
    budget = fixed + (2 + 1) * layer + layer + layer // 2  # the working set plus one resident layer
    # bfloat16 from a float32 checkpoint: fetching a layer is a cast, done in the prefetch thread
    with AutoModel.from_pretrained(
        path, max_memory=budget, prefetch=1, dtype=torch.bfloat16, profile=True
    ) as model:
        assert model.streamer_stats["resident_layers"] == [0]
        ids = torch.randint(3, 200, (1, 5))
        for _ in range(3):
            model(ids)
        report = model.profile_report()
    # nothing is ahead of the very first streamed layer: the compute thread loads it itself
    assert report["prefill"]["loaded_inline"] > 0
    # later passes: the layer after the last one (layer 1, not resident layer 0) was read ahead
    inline = report["decode_per_step"]["loaded_inline"]
    assert inline == 0, f"layers loaded by the compute thread instead of read ahead ({inline} s)"


def test_hf_token_alias_warns(llama_checkpoint):
    _, path = llama_checkpoint
    with pytest.warns(FutureWarning, match="token="):
        AutoModel.from_pretrained(path, hf_token="hf_dummy").close()


def test_default_dtype_is_the_checkpoints(tmp_path):
    from tests.models.families import build_model, save_checkpoint

    ref = build_model("llama", dtype=torch.bfloat16, seed=0)
    path = save_checkpoint(ref, tmp_path / "bf16", sharded=False)
    with AutoModel.from_pretrained(path) as model:
        assert model.dtype == torch.bfloat16
        # Buffers keep transformers' dtype: rotary inv_freq stays float32 (a cast costs exactness).
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_profiler_reports_each_step_and_the_bottleneck(llama_checkpoint):
    _, path = llama_checkpoint
    with AutoModel.from_pretrained(path, profile=True) as model:
        model.generate(
            torch.randint(3, 200, (1, 9)),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
        report = model.profile_report()
    assert report["steps"] == 4  # prefill + 3 decode steps
    assert report["prefill"]["tokens"] == 9 and report["decode_per_step"]["tokens"] == 1
    assert report["bottleneck"] in {
        "I/O (waiting for reads)",
        "compute",
        "convert",
        "copy to device",
        "I/O in page faults (compute thread)",
        "stalls (compute thread off CPU)",
    }
    assert "bottleneck" in report["summary"]
    step = report["decode_per_step"]
    for key in ("read", "wait", "convert", "copy", "compute", "total", "compute_cpu", "stalled"):
        assert step[key] >= 0
    assert step["compute_cpu"] + step["stalled"] == pytest.approx(step["compute"])


def test_profiler_counts_the_bytes_compute_faults_in_from_storage(tmp_path):
    """A pass whose layers were evicted, after a pass that read nothing from disk (so no read-ahead
    runs), makes the compute thread fault the weights in itself: the profiler must see those reads
    instead of calling the step compute. (tmp_path must be on a disk: page-out needs a file.)"""
    MADV_PAGEOUT = 21  # not exported by the mmap module
    import os

    from tests.models.families import build_model, save_checkpoint

    ref = build_model("llama", dtype=torch.float32, seed=0)
    path = save_checkpoint(ref, tmp_path / "ckpt", sharded=False)
    ids = torch.randint(3, 200, (1, 5))
    with AutoModel.from_pretrained(path, profile=True) as model:
        model(ids)
        model(ids)  # read nothing from disk: the next pass will not read ahead
        reader = model._rabbit_streamer.reader
        for file in reader.index.files:
            mapping = reader.mapping(file)
            mapping.madvise(MADV_PAGEOUT)  # unmap and reclaim our pages of it (Linux >= 5.4)
            fd = os.open(os.path.join(path, file), os.O_RDONLY)
            os.fsync(fd)  # dirty pages (the file was just written) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        model(ids)
        last = model._rabbit_profiler.steps[-1]
    assert last["fault_bytes"] > 0 and last["fault_majors"] > 0, last


def test_profiler_off_by_default(llama_checkpoint):
    _, path = llama_checkpoint
    with AutoModel.from_pretrained(path) as model:
        model(torch.randint(3, 200, (1, 5)))
        assert model.profile_report() == {"steps": 0, "bottleneck": None}


def test_read_ahead_only_while_the_model_is_not_cached(llama_checkpoint):
    _, path = llama_checkpoint  # just written: in the page cache
    with AutoModel.from_pretrained(path, profile=True) as model:
        ids = torch.randint(3, 200, (1, 5))
        for _ in range(3):
            model(ids)
        waits = [step["wait"] for step in model._rabbit_profiler.steps]
    # The compute thread waits only for read-ahead (local files in the run dtype). The first pass
    # reads ahead (nothing known yet), into the second pass's first layers too; the first pass
    # read nothing from disk, so the second reads nothing ahead, and the third waits for nothing.
    assert waits[0] > 0 and waits[1] > 0, waits
    assert waits[2] == 0, waits


def test_read_ahead_resumes_after_a_pass_that_hit_the_disk(tmp_path):
    """Evicted files (a pass that faulted them in from disk) turn read-ahead back on: the next
    pass's layers are brought in by the prefetch thread, not faulted in by compute."""
    import os

    from tests.models.families import build_model, save_checkpoint

    MADV_PAGEOUT = 21  # not exported by the mmap module
    ref = build_model("llama", dtype=torch.float32, seed=0)
    path = save_checkpoint(ref, tmp_path / "ckpt", sharded=False)
    ids = torch.randint(3, 200, (1, 5))

    def evict(reader) -> None:
        for file in reader.index.files:
            reader.mapping(file).madvise(MADV_PAGEOUT)
            fd = os.open(os.path.join(path, file), os.O_RDONLY)
            os.fsync(fd)  # dirty pages (the file was just written) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    with AutoModel.from_pretrained(path, profile=True) as model:
        reader = model._rabbit_streamer.reader
        model(ids)
        model(ids)  # cached: the next pass does not read ahead...
        evict(reader)
        model(ids)  # ...so compute faults the layers in from disk,
        evict(reader)
        model(ids)  # and this pass reads ahead again: compute waits for it
        steps = model._rabbit_profiler.steps
    assert steps[2]["wait"] == 0 and steps[2]["fault_bytes"] > 0, steps[2]
    assert steps[3]["wait"] > 0, steps[3]


def _present(mapping, start: int, end: int) -> list[bool]:
    """Whether each page of mapping[start:end] is in this process's page table (pagemap bit 63)."""
    import ctypes
    import mmap

    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    first, last = (base + start) // mmap.PAGESIZE, (base + end - 1) // mmap.PAGESIZE + 1
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(8 * first)
        entries = pagemap.read(8 * (last - first))
    return [
        bool(int.from_bytes(entries[i : i + 8], "little") >> 63) for i in range(0, len(entries), 8)
    ]


def test_page_warmer_reads_exactly_the_spans(tmp_path):
    import mmap

    from rabbit_engine.readahead import CHUNK, PageWarmer

    data = tmp_path / "blob"
    data.write_bytes(b"x" * (CHUNK + 1000))
    warmer = PageWarmer()
    try:  # pread path (no mapping)
        assert (
            warmer.warm([(str(data), 10, CHUNK + 900, None), (str(data), 0, 5, None)])
            == CHUNK + 890 + 5
        )
        assert (
            warmer.warm([(str(data), CHUNK + 900, CHUNK + 5000, None)]) == 100
        )  # stops at end of file
        with open(data, "rb") as f:  # populate path, on a private map like the reader's
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        assert not any(_present(mapped, 4096, CHUNK))  # a fresh map: no page table entries yet
        assert warmer.warm([(str(data), 4096, CHUNK, mapped)]) == CHUNK - 4096
        # MADV_POPULATE_READ fills the page tables (pread would only fill the page cache), so the
        # compute thread's views take no faults at all
        present = _present(mapped, 4096, CHUNK)
        assert all(present), f"{present.count(False)} pages not populated: read-ahead used pread"
        # cool: the kernel takes the hint (MADV_COLD) for the mapped span only; bytes unchanged
        cooled = warmer.cool([(str(data), 10, CHUNK, mapped), (str(data), 0, 10, None)])
        assert cooled == CHUNK - 10, "MADV_COLD refused"
        assert mapped[4096:4100] == b"xxxx" and mapped[CHUNK - 1] == ord("x")
        warmer.close()
        mapped.close()  # the warmer holds no buffer export on the map
    finally:
        warmer.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied head
def test_resident_weights_are_owned_copies_and_streamed_ones_are_file_views(tmp_path, family):
    """Resident weights must survive page-cache eviction (a view over the mapped file would be
    re-read from disk every token once streamed layers fill memory); streamed ones stay
    zero-copy."""
    import ctypes

    from tests.models.families import build_model, save_checkpoint

    ref = build_model(family, dtype=torch.float32, seed=0)
    path = save_checkpoint(ref, tmp_path / "ckpt", sharded=False)
    with AutoModel.from_pretrained(path, max_memory="1GiB" if family == "qwen2" else None) as model:
        reader = model._rabbit_streamer.reader
        spans = []
        for file in reader.index.files:
            mapping = reader.mapping(file)
            base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            spans.append((base, base + len(mapping)))

        def in_file(t: torch.Tensor) -> bool:
            return any(lo <= t.data_ptr() < hi for lo, hi in spans)

        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        assert not in_file(embed) and not in_file(head) and not in_file(model.model.norm.weight)
        # the copied file pages are no longer mapped (not counted twice in RSS): pagemap's
        # "present" bit is clear for every whole page of the embeddings' bytes in the file
        info = next(t for k, t in reader.index.tensors.items() if k.endswith("embed_tokens.weight"))
        base = ctypes.addressof(ctypes.c_char.from_buffer(reader.mapping(info.file)))
        first, last = -(-(base + info.offset) // 4096), (base + info.offset + info.nbytes) // 4096
        assert last > first
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(8 * first)
            entries = pagemap.read(8 * (last - first))
        present = [
            int.from_bytes(entries[i : i + 8], "little") >> 63 for i in range(0, len(entries), 8)
        ]
        assert not any(present), f"{sum(present)} of {len(present)} copied pages still mapped"
        assert (embed.data_ptr() == head.data_ptr()) == ref.config.tie_word_embeddings
        seen = []
        for layer in _layers(model):
            layer.register_forward_pre_hook(
                lambda mod, args: seen.append(in_file(mod.mlp.down_proj.weight))
            )
        ids = torch.randint(3, 200, (1, 7))
        out = model(ids).logits
        del mapping
    # qwen2 with a 1 GiB budget: every layer resident, so none is a file view
    assert seen == [family == "llama"] * len(seen) and seen
    with torch.no_grad():
        torch.testing.assert_close(out, ref(ids).logits, rtol=0, atol=1e-5)


def test_the_head_gets_contiguous_hidden_states(llama_checkpoint):
    """torch's CPU linear on a strided 3-D input copies the weight once per batch row (a 1 GB
    transient for the 2 GB bench model's head at batch 8): the engine hands the head a
    contiguous copy of the positions transformers keeps."""
    _, path = llama_checkpoint
    seen = []
    with AutoModel.from_pretrained(path) as model:
        model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: seen.append(args[0].is_contiguous())
        )
        with torch.inference_mode():
            model(input_ids=torch.ones(4, 6, dtype=torch.long), logits_to_keep=1)
    assert seen == [True]
