"""`rabbit chat`: an interactive conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the chat template and hands generate() the full ids
together with the cache of the previous turns; transformers then runs only the tokens the cache does
not hold yet. For a layer-streaming engine that matters: without the cache every turn would stream
all the weights once per token of history again.

The cache is only reused for the prefix it truly matches: after a turn it holds the ids that were
generated, while the next render re-tokenizes the reply from text (and the template may close the
turn differently), so the cache is cropped to the longest common prefix before it is passed back.

Defaults: the model's generation_config.json, else greedy replies of up to 512 new tokens that stop
when they turn into a loop. Sampling at 0.7 / top-p 0.9, the old default, made the bundled model
answer "What is the capital of France?" with 512 tokens of looping French verse; greedy answers
"Paris" (rabbitllm/generation_defaults.py has the measurement; --temperature samples).
--prompt-lookup N and --draft-model SRC speed replies that quote the conversation or the prompt.
Commands: /reset clears the conversation, /exit quits (as does Ctrl-D); Ctrl-C during a reply stops
that reply only.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from rabbit_engine.batching.requests import SamplingParams
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

MAX_NEW_TOKENS = 512  # per reply, when the model's generation_config sets no max_new_tokens
HELP = "commands: /reset (start over), /exit (or Ctrl-D), /help"


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "chat",
        parents=[common],
        help="interactive chat, keeping the KV cache between turns",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--system", help="system message")
    add_sampling_options(p, max_new_tokens=MAX_NEW_TOKENS)
    add_speculative_options(p)
    add_source_options(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def cache_argument() -> str:
    """The name generate() takes the KV cache under: `cache` in recent transformers 5.x (which still
    accept `past_key_values`, with a deprecation warning), `past_key_values` in older ones. The
    output class names its field the same way, which is what we can check without calling
    anything."""
    import dataclasses

    from transformers.generation import GenerateDecoderOnlyOutput

    fields = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    return "cache" if "cache" in fields else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache of a generate() result, under its new name or its old one."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


class ChatSession:
    """A conversation with a model: messages, plus the KV cache and the ids it covers."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        sampling: SamplingParams,
        *,
        system: str | None = None,
        draft_model: Any = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(
                "this model's tokenizer has no chat template; use `rabbit generate` instead."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.call = GenerateCall(sampling, draft_model)
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": self.system}] if self.system else []
        )
        self.cache: Any = None
        self.cached_ids: list[int] = []  # the token ids whose keys/values `cache` holds
        self.reused_tokens = 0  # of the last turn's prompt, how many came from the cache

    def _usable_cache(self, ids: list[int]) -> Any:
        """The cache cropped to the prefix it shares with `ids` (None when nothing is shared)."""
        if self.cache is None:
            return None
        keep = min(
            common_prefix(self.cached_ids, ids), len(ids) - 1
        )  # generate needs >= 1 new token
        if keep < self.cache.get_seq_length():
            if keep <= 0 or not hasattr(self.cache, "crop"):
                return None
            # a negative count removes that many tokens in every transformers 5.x; a positive one
            # was the length to keep until 5.24 made it an error
            self.cache.crop(keep - self.cache.get_seq_length())
        return self.cache

    def send(self, text: str, streamer: Any = None) -> str:
        """Add a user message, generate the reply (streamed when a streamer is given), return it."""
        import torch

        self.messages.append({"role": "user", "content": text})
        encoded = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        ids = encoded["input_ids"]
        # Speculative turns start without the previous turn's cache: transformers 5.24's assisted
        # and prompt-lookup decoding given a filled cache returns other tokens than plain greedy
        # (its own models too; 5.0 agrees). The whole conversation is then prefilled, which for a
        # streamed model is still one pass over the weights.
        cache = None if self.call.speculative else self._usable_cache(ids[0].tolist())
        self.reused_tokens = cache.get_seq_length() if cache is not None else 0
        try:
            out = self.model.generate(
                input_ids=ids.to(self.model.device),
                attention_mask=torch.ones_like(ids).to(self.model.device),
                **{cache_argument(): cache},
                streamer=streamer,
                return_dict_in_generate=True,
                **self.call.kwargs(int(ids.shape[1])),
                **pad_token_kwargs(self.model, self.tokenizer),
            )
        except BaseException:
            self.messages.pop()  # the turn did not happen; the cache may be half-updated, drop it
            self.cache, self.cached_ids = None, []
            raise
        sequence = out.sequences[0]
        self.cache = returned_cache(out)
        self.cached_ids = (
            sequence[: self.cache.get_seq_length()].tolist() if self.cache is not None else []
        )
        self.last_new_tokens = int(sequence.shape[0] - ids.shape[1])
        reply = self.tokenizer.decode(sequence[ids.shape[1] :], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def _read_line(interactive: bool) -> str | None:
    """One user line; None at end of input."""
    try:
        return input(">>> ") if interactive else input()
    except EOFError:
        return None


def run(args: argparse.Namespace, console: Console) -> int:
    runtime = runtime_options(args)
    spec = model_spec(args, progress=not console.quiet)
    source = open_model(spec, trust_remote_code=runtime.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=runtime.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"{spec.location}: the tokenizer has no chat template; use `rabbit generate` instead."
        )
    model = load_model(spec, runtime)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    try:
        sampling = sampling_from(args, model, tokenizer, max_new_tokens=MAX_NEW_TOKENS)
        draft = draft_from(args, model, tokenizer, spec, runtime)
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            console.note(f"Chatting with {spec.location}. {HELP}")
        session = ChatSession(model, tokenizer, sampling, system=args.system, draft_model=draft)
        apply_seed(sampling)
        while True:
            line = _read_line(interactive)
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                session.reset()
                console.note("(conversation cleared)")
                continue
            if text == "/help":
                console.note(HELP)
                continue
            passes_before = streamed_passes(model)
            try:
                with Timer() as timer:
                    session.send(text, streamer=make_streamer(tokenizer, console))
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the conversation
                console.result("")
                console.note("(reply interrupted; that turn is forgotten)")
                continue
            console.result("")
            passes = streamed_passes(model)
            note_stop(console, session.call)
            note_speed(
                console,
                session.last_new_tokens,
                timer.seconds,
                None if passes is None else passes - (passes_before or 0),
            )
        if runtime.profile:
            report_profile(console, model)
    finally:
        model.close()
    return 0
