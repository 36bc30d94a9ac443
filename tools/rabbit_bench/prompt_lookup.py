"""Prompt-lookup decoding on an edit-style task: tokens per streamed pass and the speed-up, cold and
warm, side by side in one run.

    python -m tools.rabbit_bench.prompt_lookup [--model SRC] [--lookup 0,4,8] [--tokens 200]

The task is what prompt lookup is for: the model is given a block of code and asked to return it
with one change, so most of its answer copies the prompt. Each row streams every decoder layer
(no layer resident) through the engine's batch scheduler (what `rabbit serve` and `rabbit batch`
run) with `SamplingParams(prompt_lookup=N)`, greedy; N=0 is the baseline. For comparison the same
is run through transformers' own `generate(prompt_lookup_num_tokens=N)` on the streamed model (what
`rabbit generate --prompt-lookup N` runs). Cold: the model's files are evicted from the page cache
before every streamed pass (a forward pre-hook, its own time left out), so each pass reads the
layers from disk; warm: they stay cached. Greedy speculative decoding must give the baseline's
tokens exactly; the table says whether it did.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import memcap

CODE = """def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, age = line.strip().split(",")
            users.append({"name": name, "age": int(age)})
    return users


def oldest(users):
    best = None
    for user in users:
        if best is None or user["age"] > best["age"]:
            best = user
    return best
"""
TASK = (
    "Add a comment line at the top of this Python code saying `# user helpers`. "
    "Output the complete code.\n\n```python\n" + CODE + "```"
)


class Evictor:
    """Forward pre-hook: the model's files leave the page cache before each pass (timed)."""

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.seconds = 0.0
        self.enabled = False

    def __call__(self, *_: object) -> None:
        if not self.enabled:
            return
        start = time.perf_counter()
        memcap.pageout_own_mappings(self.files)
        memcap.evict_files(self.files)
        self.seconds += time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    from transformers import AutoTokenizer

    from rabbit_engine.batching import BatchScheduler, SamplingParams
    from rabbitllm import AutoModel
    from rabbitllm.default_model import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else default_model_path()
    files = sorted(str(p) for p in path.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": TASK}], add_generation_prompt=True
    )
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    model = AutoModel.from_pretrained(path)  # max_memory None: every decoder layer streams
    evictor = Evictor(files)
    model.register_forward_pre_hook(evictor)
    eos = {tokenizer.eos_token_id}
    rows: list[dict] = []
    with BatchScheduler(model, max_batch=1, eos_token_ids=eos) as scheduler:
        scheduler.generate([(ids, SamplingParams(max_new_tokens=2))])  # one-time costs
        for regime in ("cold", "warm"):
            baseline: list[int] | None = None
            for engine in ("scheduler", "generate"):
                for n in args.lookup:
                    if regime == "warm":
                        memcap.warm_files(files)
                    evictor.enabled = regime == "cold"
                    evicted, passes = evictor.seconds, model.streamer_stats["passes"]
                    start = time.perf_counter()
                    if engine == "scheduler":
                        params = SamplingParams(
                            max_new_tokens=args.tokens, prompt_lookup=n, stop_on_repetition=False
                        )
                        out = scheduler.generate([(ids, params)])[0].output_ids
                    else:
                        extra = {"prompt_lookup_num_tokens": n} if n else {}
                        out = model.generate(
                            torch.tensor([ids]),
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=args.tokens,
                            do_sample=False,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.eos_token_id,
                            **extra,
                        )[0, len(ids) :].tolist()
                    seconds = time.perf_counter() - start - (evictor.seconds - evicted)
                    evictor.enabled = False
                    passes = model.streamer_stats["passes"] - passes
                    if baseline is None:
                        baseline = out
                    rows.append(
                        {
                            "regime": regime,
                            "engine": engine,
                            "lookup": n,
                            "tokens": len(out),
                            "passes": passes,
                            "tokens_per_pass": len(out) / passes if passes else 0.0,
                            "seconds": seconds,
                            "s_per_token": seconds / len(out) if out else 0.0,
                            "same_tokens": out == baseline,
                        }
                    )
    model.close()
    for row in rows:
        base = next(
            r for r in rows if r["regime"] == row["regime"] and r["engine"] == row["engine"]
        )
        row["speedup"] = base["s_per_token"] / row["s_per_token"] if row["s_per_token"] else 0.0
    return rows


def print_rows(rows: list[dict], model: str) -> None:
    print(f"prompt lookup on an edit task ({model}); every decoder layer streamed; greedy")
    print(
        f"{'regime':<7}{'engine':<11}{'N':>3}{'tokens':>8}{'passes':>8}{'tok/pass':>10}"
        f"{'s/token':>10}{'speed-up':>10}  same tokens as N=0"
    )
    for r in rows:
        print(
            f"{r['regime']:<7}{r['engine']:<11}{r['lookup']:>3}{r['tokens']:>8}{r['passes']:>8}"
            f"{r['tokens_per_pass']:>10.2f}{r['s_per_token']:>10.4f}{r['speedup']:>9.2f}x"
            f"  {'yes' if r['same_tokens'] else 'NO'}"
        )


def parse_lookup(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()} | {0})
    except ValueError:
        raise SystemExit(f"--lookup {text!r}: expected integers like 0,4,8") from None
    if min(values) < 0:
        raise SystemExit(f"--lookup {text!r}: values must be >= 0")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.rabbit_bench.prompt_lookup")
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--lookup", type=parse_lookup, default=[0, 4, 8], help="N values, e.g. 0,4,8")
    ap.add_argument("--tokens", type=int, default=200, help="max new tokens per row")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    rows = run(args)
    print_rows(rows, args.model or "default model")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
