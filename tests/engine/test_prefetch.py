"""The prefetch strategy is chosen once, at load, from what the reader says about the files."""

from __future__ import annotations

import fsspec
import torch

from rabbit_engine.prefetch import CudaStaging, FetchAhead, MappedPages, choose_prefetcher
from rabbitllm import AutoModel


def test_local_files_in_the_run_dtype_are_mapped_pages(llama_checkpoint):
    _, path = llama_checkpoint
    with AutoModel.from_pretrained(path) as model:
        streamer = model._rabbit_streamer
        assert type(streamer.prefetcher) is MappedPages
        model(torch.randint(3, 200, (1, 5)))
        # views of the mapped file: only the running layer ever holds weights
        assert model.streamer_stats["max_loaded_layers"] == 1


def test_a_cast_is_fetched_ahead_without_a_pool(llama_checkpoint):
    _, path = llama_checkpoint
    with AutoModel.from_pretrained(path, dtype=torch.bfloat16, prefetch=1) as model:
        prefetcher = model._rabbit_streamer.prefetcher
        assert type(prefetcher) is FetchAhead and prefetcher.pool is None
        model(torch.randint(3, 200, (1, 5)))
        # the running layer plus the one converted ahead
        assert model.streamer_stats["max_loaded_layers"] == 2


def test_remote_files_are_fetched_into_pooled_buffers(llama_checkpoint):
    _, path = llama_checkpoint
    fs = fsspec.filesystem("memory")
    for file in path.iterdir():
        fs.pipe(f"/prefetch-choice/{file.name}", file.read_bytes())
    with AutoModel.from_pretrained("memory:///prefetch-choice", prefetch=1) as model:
        prefetcher = model._rabbit_streamer.prefetcher
        assert type(prefetcher) is FetchAhead
        ids = torch.randint(3, 200, (1, 5))
        for _ in range(3):
            model(ids)
        # streamed layers reuse the pool's buffers, one per layer in flight (the running one and
        # the one read ahead); the resident parts are read once, outside the pool
        assert prefetcher.pool.allocated == 1 + 1


def test_a_stager_means_cuda_staging_whatever_the_storage(llama_checkpoint):
    _, path = llama_checkpoint
    with AutoModel.from_pretrained(path) as model:
        streamer = model._rabbit_streamer
        stager = object()  # stands in for a CudaStager: choosing touches no GPU
        chosen = choose_prefetcher(
            streamer.weight_map, streamer.reader, streamer.profiler, prefetch=2, stager=stager
        )
        try:
            assert type(chosen) is CudaStaging and chosen.stager is stager
            assert chosen.pool is None  # local files: no pooled buffers
        finally:
            chosen.close()
