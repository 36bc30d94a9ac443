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
            lambda mod, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[1]),
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
        model.generate(torch.randint(3, 200, (1, 9)), max_new_tokens=4, do_sample=False, pad_token_id=0)
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
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)
    with pytest.raises(MemoryBudgetError, match="at least"):
        AutoModel.from_pretrained(path, max_memory=1000)


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
        # Buffers keep transformers' dtype: rotary inv_freq stays float32 (casting it costs exactness).
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_profiler_reports_each_step_and_the_bottleneck(llama_checkpoint):
    _, path = llama_checkpoint
    with AutoModel.from_pretrained(path, profile=True) as model:
        model.generate(torch.randint(3, 200, (1, 9)), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                       pad_token_id=0)
        report = model.profile_report()
    assert report["steps"] == 4  # prefill + 3 decode steps
    assert report["prefill"]["tokens"] == 9 and report["decode_per_step"]["tokens"] == 1
    assert report["bottleneck"] in {"I/O (waiting for reads)", "compute", "convert", "copy to device"}
    assert "bottleneck" in report["summary"]
    for key in ("read", "wait", "convert", "copy", "compute", "total"):
        assert report["decode_per_step"][key] >= 0


def test_profiler_off_by_default(llama_checkpoint):
    _, path = llama_checkpoint
    with AutoModel.from_pretrained(path) as model:
        model(torch.randint(3, 200, (1, 5)))
        assert model.profile_report() == {"steps": 0, "bottleneck": None}


def test_read_ahead_only_while_the_model_is_not_cached(llama_checkpoint):
    _, path = llama_checkpoint  # just written: in the page cache
    with AutoModel.from_pretrained(path) as model:
        streamer = model._rabbit_streamer
        ids = torch.randint(3, 200, (1, 5))
        model(ids)
        assert streamer._cold  # first pass: nothing known yet, read ahead
        model(ids)
        model(ids)
        assert not streamer._cold  # no disk reads in the previous pass: no read-ahead work


def test_page_warmer_reads_exactly_the_spans(tmp_path):
    import mmap

    from rabbit_engine.readahead import CHUNK, PageWarmer

    data = tmp_path / "blob"
    data.write_bytes(b"x" * (CHUNK + 1000))
    warmer = PageWarmer()
    try:  # pread path (no mapping)
        assert warmer.warm([(str(data), 10, CHUNK + 900, None), (str(data), 0, 5, None)]) == CHUNK + 890 + 5
        assert warmer.warm([(str(data), CHUNK + 900, CHUNK + 5000, None)]) == 100  # stops at end of file
        with open(data, "rb") as f:  # populate path, on a private map like the reader's
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        assert warmer.warm([(str(data), 4096, CHUNK, mapped)]) == CHUNK - 4096
        warmer.close()
        mapped.close()  # the warmer holds no buffer export on the map
    finally:
        warmer.close()
