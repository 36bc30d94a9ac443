"""`rabbit generate [PROMPT]`: one completion, streamed to stdout as the tokens come.

Defaults, and why: sampling settings and the token budget come from the model's
generation_config.json, as in transformers; where it sets none, greedy decoding (the same prompt
gives the same text, which is what scripts, tests and benchmarks want, and small models answer
better greedy; pass --temperature for sampling) and 256 new tokens. A reply that has become a loop
stops (--no-stop-on-repetition lets it run). The chat template is applied when the tokenizer has
one, since instruction-tuned models answer a raw prompt poorly and base models have no template
(--no-chat sends the text as is). The prompt comes from the argument, or from stdin when there is
none (`echo hi | rabbit generate`).

Speculative decoding (--prompt-lookup N, --draft-model SRC) checks several proposed tokens in one
streamed pass; greedy output stays the same token for token (a loop stop may act up to one draft
later), and the speed note reports the tokens per streamed pass it reached.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rabbitllm.cli.console import Console
from rabbitllm.cli.errors import UsageError
from rabbitllm.cli.generation import (
    GenerateCall,
    Timer,
    add_sampling_options,
    add_speculative_options,
    apply_seed,
    draft_from,
    make_streamer,
    note_speed,
    note_stop,
    pad_token_kwargs,
    report_profile,
    sampling_from,
    streamed_passes,
)
from rabbitllm.cli.loading import load_model, load_tokenizer, open_model
from rabbitllm.cli.options import (
    add_runtime_options,
    add_source_options,
    model_spec,
    runtime_options,
)

MAX_NEW_TOKENS = 256  # when the model's generation_config sets no max_new_tokens


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "generate",
        parents=[common],
        help="complete a prompt, streaming the tokens",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the tokenizer's chat template (default: when the tokenizer has one)",
    )
    p.add_argument("--system", help="system message, with the chat template")
    add_sampling_options(p, max_new_tokens=MAX_NEW_TOKENS)
    add_speculative_options(p)
    add_source_options(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def read_prompt(args: argparse.Namespace, console: Console) -> str:
    """The prompt argument, else all of stdin; an empty prompt is a usage error."""
    if args.prompt is not None:
        prompt = args.prompt
    else:
        if sys.stdin is None:
            raise UsageError("no prompt: give one as an argument or on stdin.")
        if sys.stdin.isatty():
            console.note("Reading the prompt from stdin; end it with Ctrl-D.")
        prompt = sys.stdin.read()
    prompt = prompt.rstrip("\n")  # `echo` adds one; the model should not see it
    if not prompt.strip():
        raise UsageError("the prompt is empty: give one as an argument or on stdin.")
    return prompt


def encode(tokenizer: Any, prompt: str, *, chat: bool | None, system: str | None) -> dict[str, Any]:
    """input_ids and attention_mask, through the chat template when asked (or by default when
    present)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise UsageError(
            "this model's tokenizer has no chat template; drop --chat (or use --no-chat)."
        )
    if chat is None:
        chat = has_template
    if system and not chat:
        raise UsageError("--system needs the chat template; drop --no-chat or --system.")
    if not chat:
        encoded = tokenizer(prompt, return_tensors="pt")
    else:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    # only what every causal LM accepts (some tokenizers add token_type_ids)
    return {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}


def run(args: argparse.Namespace, console: Console) -> int:
    prompt = read_prompt(args, console)
    runtime = runtime_options(args)
    spec = model_spec(args, progress=not console.quiet)
    source = open_model(spec, trust_remote_code=runtime.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=runtime.trust_remote_code)
    inputs = encode(tokenizer, prompt, chat=args.chat, system=args.system)
    model = load_model(spec, runtime)
    try:
        params = sampling_from(args, model, tokenizer, max_new_tokens=MAX_NEW_TOKENS)
        draft = draft_from(args, model, tokenizer, spec, runtime)
        call = GenerateCall(params, draft)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        prompt_length = int(inputs["input_ids"].shape[-1])
        apply_seed(params)
        passes_before = streamed_passes(model)
        with Timer() as timer:
            output = model.generate(
                **inputs,
                streamer=make_streamer(tokenizer, console),
                **call.kwargs(prompt_length),
                **pad_token_kwargs(model, tokenizer),
            )
        console.result("")  # the streamed text does not end with a newline
        passes = streamed_passes(model)
        note_stop(console, call)
        note_speed(
            console,
            int(output.shape[-1] - prompt_length),
            timer.seconds,
            None if passes is None else passes - (passes_before or 0),
        )
        if runtime.profile:
            report_profile(console, model)
    finally:
        model.close()
    return 0
