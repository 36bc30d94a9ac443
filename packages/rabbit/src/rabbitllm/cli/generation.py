"""Pieces `generate` and `chat` share: sampling settings, the token streamer, the profile
summary."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from rabbitllm.cli.console import Console
from rabbitllm.cli.options import non_negative_float, positive_int, probability


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked. temperature 0 means greedy (the same prompt gives the same text)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for `model.generate`; they override the model's generation_config.json."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }

    def apply_seed(self) -> None:
        if self.seed is not None:
            from transformers import set_seed

            set_seed(self.seed)


def add_sampling_options(
    parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    parser.add_argument(
        "--max-new-tokens",
        "-n",
        type=positive_int,
        default=max_new_tokens,
        metavar="N",
        help=f"stop after N new tokens (default: {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature",
        "-t",
        type=non_negative_float,
        default=temperature,
        metavar="T",
        help=f"sampling temperature; 0 = greedy (default: {temperature:g})",
    )
    parser.add_argument(
        "--top-p",
        type=probability,
        default=top_p,
        metavar="P",
        help=f"nucleus sampling: keep the smallest token set with this much probability "
        f"(default: {top_p:g}; ignored when greedy)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, metavar="S", help="random seed, for reproducible sampling"
    )


def sampling_from(args: argparse.Namespace) -> Sampling:
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def make_streamer(tokenizer: Any, console: Console) -> Any:
    """transformers' TextStreamer, writing the decoded text to the console's stdout as it comes."""
    from transformers import TextStreamer

    class ConsoleStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            console.stdout.write(text)
            console.stdout.flush()

    return ConsoleStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def pad_token_kwargs(model: Any, tokenizer: Any) -> dict[str, Any]:
    """A pad token id when neither the model nor the tokenizer names one (silences generate's
    warning)."""
    if getattr(model.generation_config, "pad_token_id", None) is not None:
        return {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {} if pad is None else {"pad_token_id": pad}


class Timer:
    """Wall time of a generation, for the tokens/s note."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def note_speed(console: Console, new_tokens: int, seconds: float) -> None:
    rate = new_tokens / seconds if seconds > 0 else float("inf")
    console.note(f"[{new_tokens} tokens in {seconds:.1f} s, {rate:.2f} tokens/s]")


def report_profile(console: Console, model: Any) -> None:
    """The engine's profile summary on stderr (the user asked for it, so shown even with
    --quiet)."""
    report = model.profile_report()
    if not report or not report.get("steps"):
        console.report("profile: no forward steps were recorded")
        return
    prefill = report.get("prefill") or {}
    console.report(
        f"profile: {report['steps']} steps; prefill {prefill.get('total', 0.0):.3f}s; "
        f"{report.get('summary', '')}"
    )
