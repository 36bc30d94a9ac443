"""Batch inference over a dataset on Ray Data: many machines, each streaming the model.

Users who outgrow one machine have many prompts, not one giant prompt, and Ray Data is the standard
engine for that (reading and writing datasets, an actor per worker, retries when a worker dies). We
plug into it rather than write a scheduler of our own:

- `RabbitLLMPredictor`: a callable class for `Dataset.map_batches`; each Ray actor loads the model
  once and runs every row of a batch through one `BatchScheduler`, so the rows share each streamed
  pass through the weights.
- `run_batch_job`: what `rabbit batch IN -o OUT --ray ADDRESS` runs: JSONL or Parquet in and out,
  on any fsspec location, with the same rows `rabbit batch` writes.

See docs/scale-out.md for running it on a cluster. Needs the optional extra: `pip install
"rabbitllm[ray]"`.
"""

from __future__ import annotations

from rabbit_store.errors import MissingDependencyError

try:
    import ray.data  # noqa: F401  (the check; the modules below import what they use)
except ImportError as exc:
    raise MissingDependencyError(
        f'rabbitllm.ray needs Ray Data, an optional extra: pip install "rabbitllm[ray]" ({exc})'
    ) from exc

from rabbitllm.ray.job import (  # noqa: E402
    BatchInputError,
    BatchJobResult,
    options_from_cli,
    run_batch_job,
)
from rabbitllm.ray.predictor import OUTPUT_SCHEMA, RabbitLLMPredictor  # noqa: E402

__all__ = [
    "OUTPUT_SCHEMA",
    "BatchInputError",
    "BatchJobResult",
    "RabbitLLMPredictor",
    "options_from_cli",
    "run_batch_job",
]
