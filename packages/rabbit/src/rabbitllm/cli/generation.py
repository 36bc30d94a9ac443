"""Pieces `generate` and `chat` share: sampling settings, speculative decoding, the token
streamer, the speed and profile notes.

Sampling flags default to None, meaning "the model's generation_config.json, else ours": the
resolution is `rabbitllm.generation_defaults.resolve`, the same one the server and batch jobs use.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rabbit_engine.batching.requests import SamplingParams
from rabbitllm.cli.console import Console
from rabbitllm.cli.errors import UsageError
from rabbitllm.cli.options import non_negative_float, positive_int, probability
from rabbitllm.generation_defaults import eos_token_ids, generate_kwargs, resolve

FROM_MODEL = "from the model's generation_config, else"


def add_sampling_options(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --repetition-penalty, --seed,
    --stop-on-repetition; `max_new_tokens` is the fallback when the model sets none."""
    parser.add_argument(
        "--max-new-tokens",
        "-n",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"stop after N new tokens (default: {FROM_MODEL} {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature",
        "-t",
        type=non_negative_float,
        default=None,
        metavar="T",
        help=f"sampling temperature; 0 = greedy (default: {FROM_MODEL} greedy)",
    )
    parser.add_argument(
        "--top-p",
        type=probability,
        default=None,
        metavar="P",
        help="nucleus sampling: keep the smallest token set with this much probability "
        f"(default: {FROM_MODEL} 1; ignored when greedy)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help=f"sample among the K likeliest tokens; 0 = all (default: {FROM_MODEL} 50; "
        "ignored when greedy)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        metavar="R",
        help=f"divide the scores of tokens already seen by R (default: {FROM_MODEL} 1 = off)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, metavar="S", help="random seed, for reproducible sampling"
    )
    parser.add_argument(
        "--stop-on-repetition",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop when the text has become a loop, the same tokens over and over (default: on)",
    )


def add_speculative_options(parser: argparse.ArgumentParser) -> None:
    """--prompt-lookup and --draft-model: several tokens per streamed pass (transformers' assisted
    decoding), exclusive of each other."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--prompt-lookup",
        type=positive_int,
        default=None,
        metavar="N",
        help="prompt-lookup decoding: propose up to N tokens copied from the prompt, checked in "
        "one pass (pays off when the reply quotes the prompt: edits, rewrites, extraction)",
    )
    group.add_argument(
        "--draft-model",
        metavar="SRC",
        default=None,
        help="assisted decoding: a small model sharing the tokenizer (local directory or hub "
        "id), loaded whole in memory, drafts tokens that the streamed model checks in one pass",
    )


def sampling_from(
    args: argparse.Namespace, model: Any, tokenizer: Any, *, max_new_tokens: int
) -> SamplingParams:
    """The flags over the model's generation_config over our fallback."""
    config = getattr(model, "generation_config", None)
    return resolve(
        config,
        eos_token_ids=eos_token_ids(config, tokenizer),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        prompt_lookup=args.prompt_lookup or 0,
        stop_on_repetition=args.stop_on_repetition,
        fallback_max_new_tokens=max_new_tokens,
    )


def apply_seed(params: SamplingParams) -> None:
    if params.seed is not None:
        from transformers import set_seed

        set_seed(params.seed)


class GenerateCall:
    """What one `model.generate` call gets besides the inputs, and what it noticed.

    Holds the draft model (if any) across chat turns; a fresh `RepetitionStop` per call knows
    where that call's prompt ends.
    """

    def __init__(self, params: SamplingParams, draft_model: Any = None) -> None:
        self.params = params
        self.draft_model = draft_model
        self.repetition_stop: Any = None

    def kwargs(self, prompt_length: int) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        from rabbit_engine.batching.repetition import RepetitionStop

        kwargs = generate_kwargs(self.params)
        self.repetition_stop = None
        if self.params.stop_on_repetition:
            self.repetition_stop = RepetitionStop(prompt_length)
            kwargs["stopping_criteria"] = StoppingCriteriaList([self.repetition_stop])
        if self.params.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = self.params.prompt_lookup
        if self.draft_model is not None:
            kwargs["assistant_model"] = self.draft_model
        return kwargs

    @property
    def speculative(self) -> bool:
        return bool(self.params.prompt_lookup) or self.draft_model is not None

    @property
    def stopped_on_repetition(self) -> bool:
        return self.repetition_stop is not None and self.repetition_stop.triggered


def text_vocab_size(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def load_draft_model(
    src: str,
    model: Any,
    tokenizer: Any,
    *,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The draft for assisted decoding: transformers' own model, whole in memory on the target's
    device and dtype (it runs once per drafted token, so streaming it would cost what it saves).

    transformers treats an equal vocabulary size as "same tokenizer" and otherwise wants two
    tokenizers (universal assisted decoding); we only support the shared tokenizer, so a
    different size, or a draft tokenizer with a different vocabulary, is refused here.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src, token=token, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--draft-model {src}: cannot read its config.json ({exc})") from exc
    target_size, draft_size = text_vocab_size(model), text_vocab_size(config)
    if target_size != draft_size:
        raise UsageError(
            f"--draft-model {src}: its vocabulary has {draft_size} entries, the model's has "
            f"{target_size}; a draft must share the model's tokenizer (use a smaller model of "
            "the same family, or --prompt-lookup)."
        )
    try:
        draft_tokenizer = AutoTokenizer.from_pretrained(
            src, token=token, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError):
        draft_tokenizer = None  # a checkpoint without tokenizer files: the size check must do
    if draft_tokenizer is not None and draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError(
            f"--draft-model {src}: its tokenizer maps tokens to different ids than the model's; "
            "a draft must share the model's tokenizer."
        )
    draft = AutoModelForCausalLM.from_pretrained(
        src, token=token, trust_remote_code=trust_remote_code, dtype=model.dtype
    )
    return draft.to(model.device).eval()


def draft_from(args: argparse.Namespace, model: Any, tokenizer: Any, spec: Any, runtime: Any):
    """The `--draft-model` of a command (checked, resident), or None without the flag."""
    if not getattr(args, "draft_model", None):
        return None
    return load_draft_model(
        args.draft_model,
        model,
        tokenizer,
        token=spec.token,
        trust_remote_code=runtime.trust_remote_code,
    )


def scheduler_draft(args: argparse.Namespace, model: Any, tokenizer: Any, spec: Any, runtime: Any):
    """`--draft-model` for the batch scheduler (`rabbit serve`, `rabbit batch`): the model
    `generate` uses, proposing for every greedy request in the shared pass."""
    draft = draft_from(args, model, tokenizer, spec, runtime)
    if draft is None:
        return None
    from rabbit_engine.batching.draft import DraftModel

    return DraftModel(draft)


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


def streamed_passes(model: Any) -> int | None:
    """Streamed forward passes so far (None for a model that does not stream)."""
    stats = getattr(model, "streamer_stats", None)
    return None if stats is None else int(stats.get("passes", 0))


def note_speed(
    console: Console, new_tokens: int, seconds: float, passes: int | None = None
) -> None:
    """Tokens/s, and tokens per streamed pass: one pass reads every streamed layer once, so with
    speculative decoding the second figure is what the draft saved."""
    rate = new_tokens / seconds if seconds > 0 else float("inf")
    note = f"[{new_tokens} tokens in {seconds:.1f} s, {rate:.2f} tokens/s"
    if passes:
        note += f"; {passes} streamed passes, {new_tokens / passes:.2f} tokens/pass"
    console.note(note + "]")


def note_stop(console: Console, call: GenerateCall) -> None:
    if call.stopped_on_repetition:
        console.note(
            "[stopped: the text was repeating itself; --no-stop-on-repetition lets it run]"
        )


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
