"""Side-by-side decode benchmark: RabbitLLM vs transformers, accelerate disk offload, llama.cpp.

Makes (or reuses) a Llama-shaped random bf16 checkpoint, then runs every engine in its own process
in up to three regimes and prints one table with the ratio of each decode step to that regime's
floor:

  cold      larger than memory: each engine's memory, page cache included, is capped below the
            model's size (a child memory cgroup), so every token re-reads the weights from disk.
            Without a usable cgroup, the child evicts the files' pages after every step instead.
            floor = decoder-layer bytes / cold sequential read bandwidth under the same cap.
            Engine `rabbit-auto` (this regime only) is RabbitLLM with max_memory="auto": it keeps
            as many layers in memory as the cgroup allows and streams the rest; its floor counts
            only the bytes it streams.
  warm      files in the page cache, RabbitLLM streams every layer (max_memory=None).
            floor = transformers' in-memory decode step, measured in the same run.
  resident  RabbitLLM with a budget >= the model: everything stays resident.
            floor = transformers' in-memory decode step, measured in the same run.

Rows on bytes of their own: `rabbit-8bit`/`rabbit-4bit` stream a compressed split of the checkpoint
(written once, before any timing); `llamacpp-bf16`/`-q8_0`/`-q4_0` run llama.cpp's CPU library (the
llama-cpp-py-sync wheel) on the checkpoint written as GGUF, checked against transformers first.
Each has its own floor: its bytes read per token / the cold bandwidth, or its in-memory step when
that is larger (goals.py says which run gives that step).

Only ratios measured side by side in one run mean anything; absolute times depend on the machine
and on whatever else it is doing (the load average is printed with the results).

Run from the checkout's root (a development tool: it is not installed with any package):

  python -m tools.rabbit_bench                 # ~2 GB model, every engine and regime
  python -m tools.rabbit_bench --quick         # a few-MB model: smoke test of the whole harness
  python -m tools.rabbit_bench --regimes cold --engines rabbit,accelerate --tokens 8 --json o.json
  python -m tools.rabbit_bench --engines rabbit --concurrency 1,2,4,8,16   # + streams per pass

Modules: cli (flags, the run's order), spec (engines, regimes, each child's spec), runner (child
processes), child (one engine in one process), goals (floors, ratios, goals), table (the printed
results), checkpoint (the generated model and its facts), memcap (cgroup caps, page cache), machine,
gguf_export (the checkpoint as GGUF, and its check), llamacpp (llama.cpp's library, made loadable),
concurrency (--concurrency: C requests sharing each streamed pass through the batch scheduler).
Beside the bench: readpaths (engine-free read-path micro-benchmark), larger_than_ram (a model
bigger than RAM, by hand), split (rabbit split against cp).

The parent process never imports torch (children do): its RSS and caches stay out of the
measurements, and a cgroup cap applies to the engine alone.
"""
