"""The object users get: transformers' own model class, with streaming attached.

The instance's class is swapped for a subclass that adds a few attributes (the same technique PEFT
and accelerate use) so it stays a `GenerationMixin`/`PreTrainedModel` in every check transformers
does.
"""

from __future__ import annotations

import functools

import torch


class StreamingModelMixin:
    """Extra surface of a streaming model; everything else is transformers'."""

    _rabbit_streamer = None
    _rabbit_device: torch.device
    _rabbit_profiler = None

    @property
    def device(self) -> torch.device:  # the first parameter may be a meta placeholder
        return self._rabbit_device

    @property
    def active_attention_implementation(self) -> str:
        """The decoder's: a multimodal class's top config may name its vision tower's."""
        return self.config.get_text_config()._attn_implementation

    @property
    def streamer_stats(self) -> dict:
        s = self._rabbit_streamer
        return {
            "num_layers": s.num_layers,
            "resident_layers": sorted(s.resident_layers),
            "prefetch": s.prefetch,
            "max_loaded_layers": s.max_loaded,
            "passes": s.passes,
        }

    def profile_report(self) -> dict:
        """Per-step timings and the bottleneck (empty unless built with `profile=True`)."""
        return self._rabbit_profiler.report()

    def __call__(self, *args, **kwargs):
        profiler = self._rabbit_profiler
        if profiler is None or not profiler.enabled:
            return super().__call__(*args, **kwargs)
        profiler.step_begin()
        out = super().__call__(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        profiler.step_end(int(ids.shape[-1]) if ids is not None else 0)
        return out

    def close(self) -> None:
        """Stop the prefetch thread and unmap the files; the model cannot run afterwards."""
        if self._rabbit_streamer is not None:
            self._rabbit_streamer.close()
            self._rabbit_streamer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Give the output head contiguous hidden states.

    transformers slices the last positions (`logits_to_keep`) as a strided view; torch's CPU
    `linear` on a strided 3-D input of batch B then copies the head's weight once per row
    (measured with torch 2.13: +1.0 GB for a 32000x2048 bf16 head at B=8), which an 8-request batch
    prefill of the 2 GB bench model turned into an out-of-memory kill under its memory cap. A
    contiguous copy of the few kept positions costs nothing next to that.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


@functools.lru_cache(maxsize=None)
def streaming_class(cls: type) -> type:
    return type(
        f"Streaming{cls.__name__}", (StreamingModelMixin, cls), {"__module__": cls.__module__}
    )
