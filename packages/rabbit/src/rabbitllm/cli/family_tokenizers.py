"""Tokenizers of the families whose checkpoints ship their tokenizer as code, built without it.

QWen v1, ChatGLM2/3, Baichuan/Baichuan2, InternLM and InternLM2 checkpoints name a tokenizer class
of their own (`auto_map`), which `AutoTokenizer` only builds by running the checkpoint's Python
(`trust_remote_code=True`). That code is a thin wrapper around a vocabulary file transformers can
read itself: a sentencepiece BPE model (`tokenizer.model`) or a tiktoken BPE file
(`qwen.tiktoken`). So the tokenizer is built here from that file with transformers' own classes
(`LlamaTokenizer`, which encodes a sentencepiece BPE model; `TikTokenConverter`), plus the few
facts the family's code adds around it: QWen's split pattern and special tokens, ChatGLM's special
tokens after the sentencepiece vocabulary and its `[gMASK] sop` prefix. When the file is missing
or is not one transformers can read, the error says so and names --trust-remote-code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rabbitllm.cli.errors import TokenizerNotFoundError

logger = logging.getLogger(__name__)

SENTENCEPIECE_FILE = "tokenizer.model"
QWEN_FILE = "qwen.tiktoken"

#: QWen v1's pre-tokenizer split (tokenization_qwen.PAT_STR): one digit per piece, unlike the
#: `\p{N}{1,3}` of TikTokenConverter's default (cl100k).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_ENDOFTEXT = "<|endoftext|>"
#: QWen v1's special tokens, numbered from the end of the BPE ranks (151643 in the release).
QWEN_SPECIALS = (QWEN_ENDOFTEXT, "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)
#: ChatGLM2's special tokens (then ChatGLM3's role tokens), numbered from the end of the
#: sentencepiece vocabulary; `[gMASK] sop` starts every encoded text.
CHATGLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop") + (
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
CHATGLM_PREFIX = ("[gMASK]", "sop")
_SPM_BPE = 2  # sentencepiece's TrainerSpec.ModelType.BPE


class RemoteVocabularyError(TokenizerNotFoundError):
    """A remote-code family's tokenizer cannot be built from its vocabulary file (missing, or
    one transformers cannot read); its own code could, with --trust-remote-code."""


@dataclass(frozen=True)
class FamilyVocabulary:
    """Where a family's tokenizer code reads its vocabulary, and what that code does by default."""

    model_type: str
    vocab_file: str
    tokenizer_class: str  # the checkpoint's own class, named in errors
    add_bos_token: bool = False  # the class's default when tokenizer_config.json says nothing


FAMILY_VOCABULARIES: dict[str, FamilyVocabulary] = {
    v.model_type: v
    for v in (
        FamilyVocabulary("qwen", QWEN_FILE, "QWenTokenizer"),
        FamilyVocabulary("chatglm", SENTENCEPIECE_FILE, "ChatGLMTokenizer"),
        FamilyVocabulary("baichuan", SENTENCEPIECE_FILE, "BaichuanTokenizer", add_bos_token=True),
        FamilyVocabulary("internlm", SENTENCEPIECE_FILE, "InternLMTokenizer", add_bos_token=True),
        FamilyVocabulary("internlm2", SENTENCEPIECE_FILE, "InternLM2Tokenizer", add_bos_token=True),
    )
}


def family_vocabulary(model_type: str | None) -> FamilyVocabulary | None:
    """The vocabulary facts of a remote-code family, or None for any other model_type."""
    return FAMILY_VOCABULARIES.get(model_type) if model_type else None


def missing_vocabulary_error(family: FamilyVocabulary, location: str) -> RemoteVocabularyError:
    return RemoteVocabularyError(
        f"{location}: {family.model_type} checkpoints ship their tokenizer as code "
        f"({family.tokenizer_class}), which RabbitLLM does not run; it builds the tokenizer from "
        f"the vocabulary file {family.vocab_file} with transformers instead, and {location} has "
        f"no {family.vocab_file}. Pass --trust-remote-code to run the checkpoint's own tokenizer "
        "code (only for a checkpoint you trust)."
    )


def load_family_tokenizer(folder: str, family: FamilyVocabulary, location: str) -> Any:
    """transformers' tokenizer of a remote-code family's checkpoint files in `folder`, built from
    its vocabulary file without running the checkpoint's code."""
    path = Path(folder, family.vocab_file)
    if not path.is_file():
        raise missing_vocabulary_error(family, location)
    config = _tokenizer_config(Path(folder), location)
    logger.info(
        "model_type=%r: tokenizer built from %s by transformers (the checkpoint's %s not run)",
        family.model_type,
        family.vocab_file,
        family.tokenizer_class,
    )
    if family.vocab_file == QWEN_FILE:
        return _qwen(path, config, location)
    return _sentencepiece(path, config, family, location)


def _tokenizer_config(folder: Path, location: str) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RemoteVocabularyError(
            f"{location}/tokenizer_config.json is not valid JSON: {exc}"
        ) from exc
    return data if isinstance(data, dict) else {}


def _unreadable(location: str, name: str, why: str) -> RemoteVocabularyError:
    return RemoteVocabularyError(
        f"{location}/{name}: transformers cannot build a tokenizer from it ({why}). Pass "
        "--trust-remote-code to run the checkpoint's own tokenizer code (only for a checkpoint "
        "you trust)."
    )


def _qwen(path: Path, config: dict[str, Any], location: str) -> Any:
    """QWen v1: tiktoken BPE ranks, QWen's split pattern, its 208 special tokens after them."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(path))
        backend = TikTokenConverter(
            vocab_file=str(path), pattern=QWEN_PATTERN, extra_special_tokens=QWEN_SPECIALS
        ).converted()
    except ImportError as exc:
        raise _unreadable(location, path.name, f"tiktoken is not installed: {exc}") from exc
    except Exception as exc:  # tiktoken raises ValueError, binascii.Error, UnicodeError...
        raise _unreadable(location, path.name, f"{type(exc).__name__}: {exc}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise _unreadable(location, path.name, "its ranks are not 0..N-1")
    first = backend.token_to_id(QWEN_ENDOFTEXT)
    if first != len(ranks):  # a special token that is also a BPE piece
        raise _unreadable(location, path.name, f"{QWEN_ENDOFTEXT} is id {first}, not {len(ranks)}")
    kwargs: dict[str, Any] = {"eos_token": QWEN_ENDOFTEXT, "pad_token": QWEN_ENDOFTEXT}
    for key in ("chat_template", "model_max_length"):
        if key in config:
            kwargs[key] = config[key]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _sentencepiece(
    path: Path, config: dict[str, Any], family: FamilyVocabulary, location: str
) -> Any:
    """A sentencepiece BPE model through transformers' LlamaTokenizer (BPE with byte fallback
    and the "▁" metaspace, which is what sentencepiece runs), set up as the model's own
    normalizer spec says; each text between special tokens gets its dummy prefix, as the
    families' code (sentencepiece once per piece of text) does."""
    from tokenizers import Regex, normalizers
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    try:
        proto = SentencePieceExtractor(str(path)).proto
    except ImportError as exc:
        raise _unreadable(location, path.name, f"a package is missing: {exc}") from exc
    except Exception as exc:  # protobuf's DecodeError and friends
        raise _unreadable(
            location, path.name, f"not a sentencepiece model: {type(exc).__name__}: {exc}"
        ) from exc
    if proto.trainer_spec.model_type != _SPM_BPE or not proto.pieces:
        raise _unreadable(
            location,
            path.name,
            f"a sentencepiece model of type {proto.trainer_spec.model_type}, not BPE",
        )
    spec = proto.normalizer_spec
    trainer = proto.trainer_spec
    defaults: dict[str, Any] = {
        "add_prefix_space": spec.add_dummy_prefix,
        "legacy": True,
        "add_bos_token": family.add_bos_token,
        "add_eos_token": False,
        "unk_token": trainer.unk_piece or "<unk>",
        "bos_token": trainer.bos_piece or "<s>",
        "eos_token": trainer.eos_piece or "</s>",
    }
    if family.model_type == "chatglm":
        # ChatGLM matches its special tokens in text only with encode_special_tokens=True
        defaults["split_special_tokens"] = not config.get("encode_special_tokens", False)
        defaults["pad_token"] = defaults["unk_token"]
        defaults["add_bos_token"] = False  # the [gMASK] sop prefix instead, below
    overrides = {k: v for k, v in defaults.items() if k not in config}
    try:
        tokenizer = LlamaTokenizer.from_pretrained(str(path.parent), **overrides)
    except Exception as exc:  # transformers raises many types for one unusable file
        raise _unreadable(location, path.name, f"{type(exc).__name__}: {exc}") from exc
    # LlamaTokenizer always falls back to byte pieces and has no unknown piece; sentencepiece
    # falls back to bytes only if trained to, and otherwise encodes unknown text as <unk>
    model = tokenizer.backend_tokenizer.model
    model.byte_fallback = trainer.byte_fallback
    model.unk_token = trainer.unk_piece or "<unk>"
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if spec.add_dummy_prefix:
        # sentencepiece prefixes "▁" even to a text that starts with a space; Metaspace does not
        steps.append(normalizers.Replace(Regex(r"\A "), "  "))
    if steps:
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(steps)
    if family.model_type == "chatglm":
        _chatglm(tokenizer, len(proto.pieces), location, path.name)
    return tokenizer


def _chatglm(tokenizer: Any, size: int, location: str, name: str) -> None:
    """ChatGLM's special tokens at the ids its code gives them, and the `[gMASK] sop` prefix."""
    from tokenizers import processors
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATGLM_SPECIALS if t not in vocab]
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
    )
    for offset, token in enumerate(CHATGLM_SPECIALS):
        found = tokenizer.convert_tokens_to_ids(token)
        if found != size + offset:
            raise _unreadable(
                location,
                name,
                f"ChatGLM's {token} would be id {found}, its code says {size + offset}",
            )
    prefix = " ".join(f"{t}:0" for t in CHATGLM_PREFIX)
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{prefix} $A:0",
        pair=f"{prefix} $A:0 $B:1 {eos}:1",
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in (*CHATGLM_PREFIX, eos)],
    )
