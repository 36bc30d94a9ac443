"""`--prompt-lookup N` and `--draft-model SRC`: several tokens per streamed pass, same greedy text.

The oracle is transformers' guarantee for greedy assisted decoding: the verified output equals
plain greedy token for token. What speculation must add is fewer streamed passes than tokens,
read from the speed note (`model.streamer_stats["passes"]` before and after generate).

The draft test uses one tiny random Llama (SmolLM2's tokenizer, spread weights so greedy logits
have no near-ties) both as the streamed target and as the resident draft: the draft then proposes
exactly what the target would say, so every draft is accepted and passes drop the most.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.chat_model import build_tiny_chat_model
from tests.cli.conftest import finish, run_rabbit, start_rabbit

SPEED = re.compile(
    r"\[(\d+) tokens in [\d.]+ s, [\d.inf]+ tokens/s; (\d+) streamed passes, ([\d.]+) tokens/pass\]"
)
TYPO_PROMPT = (
    "Fix the spelling mistake in this text and reply with the corrected text only:\n\n"
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and the "
    "chidlren were playing on the swings while their parents sat on the benches and talked "
    "about the weather."
)


def tokens_and_passes(stderr: str) -> tuple[int, int]:
    match = SPEED.search(stderr)
    assert match, f"no speed note with passes in:\n{stderr[-2000:]}"
    return int(match.group(1)), int(match.group(2))


def save_tiny_llama(
    path: Path, *, vocab_extra: int = 0, generation_config: dict | None = None
) -> Path:
    """tests/chat_model.py's tiny Llama with SmolLM2's tokenizer, with a 1024-token context."""
    return build_tiny_chat_model(
        path, context=1024, vocab_extra=vocab_extra, generation_config=generation_config
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-target"))


@pytest.fixture(scope="module")
def wider_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-wider"), vocab_extra=64)


def test_draft_model_gives_greedy_text_in_fewer_passes(default_model_cache, tiny_dir):
    env = default_model_cache.env
    # a random model may loop; the loop stop acts after whole accepted drafts, so it is off here
    common = ["generate", "The rabbit", "--model", str(tiny_dir), "--no-chat", "-n", "40"]
    common += ["--no-stop-on-repetition"]
    plain = start_rabbit(common, env)
    drafted = start_rabbit([*common, "--draft-model", str(tiny_dir)], env)
    plain, drafted = finish(plain), finish(drafted)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert drafted.returncode == 0, drafted.stderr[-3000:]
    assert drafted.stdout == plain.stdout and plain.stdout.strip()
    tokens, passes = tokens_and_passes(plain.stderr)
    assert (tokens, passes) == (40, 40), "plain greedy: one pass per token"
    tokens, passes = tokens_and_passes(drafted.stderr)
    assert tokens == 40 and passes < tokens / 2, f"{passes} passes for {tokens} tokens"


def test_draft_with_another_vocabulary_is_refused(default_model_cache, tiny_dir, wider_dir):
    result = run_rabbit(
        ["generate", "hi", "--model", str(tiny_dir), "--draft-model", str(wider_dir), "-n", "2"],
        default_model_cache.env,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--draft-model" in result.stderr and "share the model's tokenizer" in result.stderr
    assert "Traceback" not in result.stderr


def test_prompt_lookup_and_draft_exclude_each_other(default_model_cache, tiny_dir):
    result = run_rabbit(
        ["generate", "hi", "--prompt-lookup", "4", "--draft-model", str(tiny_dir)],
        default_model_cache.env,
    )
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


@pytest.mark.slow
def test_prompt_lookup_on_an_edit_gives_greedy_text_in_fewer_passes(default_model_cache):
    """The default model asked to correct a paragraph copies it: prompt lookup proposes the
    copy and each pass accepts several tokens (measured: 44 tokens in 7 passes with N=10)."""
    env = default_model_cache.env
    common = ["generate", TYPO_PROMPT, "-n", "48"]
    plain = start_rabbit(common, env)
    lookup = start_rabbit([*common, "--prompt-lookup", "10"], env)
    plain, lookup = finish(plain), finish(lookup)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert lookup.returncode == 0, lookup.stderr[-3000:]
    assert lookup.stdout == plain.stdout and "quick brown fox" in plain.stdout
    tokens, passes = tokens_and_passes(plain.stderr)
    assert passes == tokens
    tokens, passes = tokens_and_passes(lookup.stderr)
    assert tokens >= 2 * passes, f"{passes} passes for {tokens} tokens"


def test_chat_turns_with_speculation_equal_plain_greedy(tiny_dir):
    """In process, two turns each: the second turn of a speculative chat must answer what a plain
    one answers (on transformers 5.24 a reused cache broke that; such turns now prefill)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rabbitllm import AutoModel
    from rabbitllm.cli.chat import ChatSession
    from rabbitllm.generation_defaults import resolve

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    draft = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    replies, passes = {}, {}
    with AutoModel.from_pretrained(tiny_dir, device="cpu") as model:
        for name, lookup, draft_model in (
            ("plain", 0, None),
            ("lookup", 4, None),
            ("draft", 0, draft),
        ):
            params = resolve(
                model.generation_config,
                eos_token_ids={tok.eos_token_id},
                max_new_tokens=16,
                prompt_lookup=lookup,
                stop_on_repetition=False,
            )
            session = ChatSession(model, tok, params, draft_model=draft_model)
            before = model.streamer_stats["passes"]
            replies[name] = [session.send("Hello there, rabbit"), session.send("Tell me more")]
            passes[name] = model.streamer_stats["passes"] - before
    assert replies["lookup"] == replies["plain"] == replies["draft"]
    assert passes["draft"] < passes["plain"]


def test_draft_whose_tokenizer_differs_is_refused(tiny_dir):
    """Equal vocabulary sizes are not enough when the draft ships a tokenizer that maps tokens to
    other ids (in process: the check runs before the draft's weights are loaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rabbitllm.cli.errors import UsageError
    from rabbitllm.cli.generation import load_draft_model

    target = AutoModelForCausalLM.from_pretrained(tiny_dir)
    real = AutoTokenizer.from_pretrained(tiny_dir)
    assert load_draft_model(str(tiny_dir), target, real).config.vocab_size == len(real)

    class Shuffled:
        def get_vocab(self) -> dict[str, int]:
            vocab = real.get_vocab()
            a, b = sorted(vocab)[:2]
            vocab[a], vocab[b] = vocab[b], vocab[a]
            return vocab

    with pytest.raises(UsageError, match="maps tokens to different ids"):
        load_draft_model(str(tiny_dir), target, Shuffled())
