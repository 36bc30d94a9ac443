"""Tokenizers of the remote-code families, built from their vocabulary files without their code.

Each test makes its own small vocabulary: a sentencepiece BPE model trained on a few hundred
sentences (InternLM, InternLM2, Baichuan, ChatGLM: their `tokenizer.model`) or a tiktoken BPE file
(QWen's `qwen.tiktoken`), with the special-token configuration the family's real
tokenizer_config.json has (auto_map and all: nothing here runs it, there is no .py file). The
reference for each encoding is the vocabulary's own library, which is what the family's tokenizer
code calls: `SentencePieceProcessor.encode` (plus the family's bos or `[gMASK] sop`), and
`tiktoken.Encoding` with QWen's split pattern and special tokens. `rabbit generate` then runs on
the fixture checkpoints of ../shared/fixtures/remote-code with these vocabularies beside them.
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
from pathlib import Path

import pytest

from rabbit_store import open_source
from rabbitllm.cli.errors import TokenizerNotFoundError
from rabbitllm.cli.family_tokenizers import (
    CHATGLM_SPECIALS,
    QWEN_PATTERN,
    QWEN_SPECIALS,
    RemoteVocabularyError,
)
from rabbitllm.cli.loading import load_tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "remote-code"
MODEL_VOCAB = 256  # every fixture's vocab_size: a vocabulary must not name a larger id

_rng = random.Random(0)
WORDS = [
    "".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(2, 7)))
    for _ in range(300)
]
CORPUS = [" ".join(_rng.choice(WORDS) for _ in range(9)) for _ in range(600)]
TEXTS = [
    " ".join(WORDS[:6]),
    f"{WORDS[7]}  {WORDS[8]}   {WORDS[9]}",  # runs of spaces, kept as they are
    f" {WORDS[10]} {WORDS[11]}",  # a leading space
    WORDS[12],
]
INTERNLM2_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
]
CHATML = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\\n "
    "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\\n {{ message['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _auto_map(module: str, cls: str) -> dict:
    return {"AutoTokenizer": [f"{module}.{cls}", None]}


def _added(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


#: family -> (sentencepiece add_dummy_prefix, user-defined pieces, tokenizer_config.json as the
#: real checkpoints have it); the sentencepiece families.
SPM_FAMILIES = {
    "internlm": (
        True,
        [],
        {
            "auto_map": _auto_map("tokenization_internlm", "InternLMTokenizer"),
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "</s>",
            "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "InternLMTokenizer",
        },
    ),
    "internlm2": (
        True,
        INTERNLM2_SPECIALS,
        {
            "auto_map": {
                "AutoTokenizer": [
                    "tokenization_internlm2.InternLM2Tokenizer",
                    "tokenization_internlm2_fast.InternLM2TokenizerFast",
                ]
            },
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "</s>",
            "unk_token": "<unk>",
            "additional_special_tokens": INTERNLM2_SPECIALS,
            "chat_template": CHATML,
            "clean_up_tokenization_spaces": False,
            "decode_with_prefix_space": False,
            "sp_model_kwargs": None,
            "tokenizer_class": "InternLM2Tokenizer",
        },
    ),
    "baichuan": (
        False,
        [],
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "auto_map": _auto_map("tokenization_baichuan", "BaichuanTokenizer"),
            "bos_token": _added("<s>"),
            "eos_token": _added("</s>"),
            "pad_token": _added("<unk>"),
            "unk_token": _added("<unk>"),
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "sp_model_kwargs": {},
            "tokenizer_class": "BaichuanTokenizer",
        },
    ),
    "chatglm": (
        True,
        [],
        {
            "auto_map": _auto_map("tokenization_chatglm", "ChatGLMTokenizer"),
            "chat_template": CHATGLM3_TEMPLATE,
            "do_lower_case": False,
            "padding_side": "left",
            "remove_space": False,
            "tokenizer_class": "ChatGLMTokenizer",
        },
    ),
}
QWEN_CONFIG = {
    "auto_map": _auto_map("tokenization_qwen", "QWenTokenizer"),
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
}
#: QWen's BPE ranks: every byte the texts use, then merges; "12" merges in the file, but QWen's
#: split pattern (one digit per piece) must keep it apart, unlike TikTokenConverter's default.
QWEN_BYTES = sorted(set("abcdefghijklmnopqrstuvwxyz .,\n0123456789"))
QWEN_MERGES = ["th", "he", "the", " the", "at", "in", "an", "12"]
QWEN_TEXTS = [
    "the cat sat on the mat, then 12 and 2024.",
    "in an hat\n\nthe end",
    "<|im_start|>user\nhi there<|im_end|>\n",
]


def train_spm(
    *,
    add_dummy_prefix: bool,
    vocab_size: int,
    user_defined=(),
    model_type: str = "bpe",
    normalization: str = "identity",
    remove_extra_whitespaces: bool = False,
) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name=normalization,
        remove_extra_whitespaces=remove_extra_whitespaces,
        add_dummy_prefix=add_dummy_prefix,
        byte_fallback=False,
        user_defined_symbols=list(user_defined),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def qwen_ranks() -> dict[bytes, int]:
    tokens = [c.encode() for c in QWEN_BYTES] + [m.encode() for m in QWEN_MERGES]
    ranks = {t: i for i, t in enumerate(tokens)}
    assert len(ranks) + len(QWEN_SPECIALS) == MODEL_VOCAB
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items())
    path.write_text("\n".join(lines) + "\n")


def checkpoint(tmp_path: Path, family: str, *, vocabulary: bool = True) -> Path:
    """The fixture's config.json and weights, the family's tokenizer_config.json and (unless
    `vocabulary` is False) its vocabulary file: a checkpoint as the hub has it, minus its code."""
    src = FIXTURES / family
    if not (src / "config.json").is_file():
        pytest.fail(
            f"remote-code fixture {family!r} is missing at {src.resolve()}: these tests need "
            "../shared/fixtures/remote-code from the repository root."
        )
    folder = tmp_path / family
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(src / name, folder / name)
    if family == "qwen":
        (folder / "tokenizer_config.json").write_text(json.dumps(QWEN_CONFIG))
        if vocabulary:
            write_tiktoken(folder / "qwen.tiktoken", qwen_ranks())
        return folder
    prefix, user, config = SPM_FAMILIES[family]
    size = MODEL_VOCAB - (len(CHATGLM_SPECIALS) if family == "chatglm" else 0)
    model = train_spm(add_dummy_prefix=prefix, vocab_size=size, user_defined=user)
    if vocabulary:
        (folder / "tokenizer.model").write_bytes(model)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _spm(folder: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def _load(folder: Path):
    return load_tokenizer(open_source(str(folder)))


# ---- encoding equals the vocabulary library's; decoding gives the text back ----------------------
@pytest.mark.parametrize("family", sorted(SPM_FAMILIES))
def test_sentencepiece_families_encode_as_sentencepiece_does(family, tmp_path):
    folder = checkpoint(tmp_path, family)
    assert not list(folder.glob("*.py"))
    sp = _spm(folder)
    tokenizer = _load(folder)
    config = SPM_FAMILIES[family][2]
    if family == "chatglm":
        prefix = [sp.get_piece_size() + CHATGLM_SPECIALS.index(t) for t in ("[gMASK]", "sop")]
    elif config.get("add_bos_token", True):
        prefix = [sp.bos_id()]
    else:
        prefix = []
    for text in TEXTS:
        expected = prefix + sp.encode(text)
        assert tokenizer(text)["input_ids"] == expected, text
        assert tokenizer.decode(expected, skip_special_tokens=True) == text
    assert max(tokenizer.get_vocab().values()) < MODEL_VOCAB


def test_a_normalizing_sentencepiece_model_normalizes_alike(tmp_path):
    """NFKC (a precompiled charsmap) and runs of spaces removed, as the model's spec says."""
    folder = checkpoint(tmp_path, "internlm")
    model = train_spm(
        add_dummy_prefix=True,
        vocab_size=MODEL_VOCAB,
        normalization="nmt_nfkc",
        remove_extra_whitespaces=True,
    )
    (folder / "tokenizer.model").write_bytes(model)
    sp = _spm(folder)
    tokenizer = _load(folder)
    for text in [*TEXTS, f"  {WORDS[1]}\u3000{WORDS[2]}  ", f"\uff41{WORDS[3]}"]:  # ideographic
        # space and fullwidth "a": NFKC makes them a space and "a"
        assert tokenizer(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], repr(text)


def test_chatglm_special_tokens_follow_the_vocabulary(tmp_path):
    folder = checkpoint(tmp_path, "chatglm")
    size = _spm(folder).get_piece_size()
    tokenizer = _load(folder)
    assert tokenizer.convert_tokens_to_ids(list(CHATGLM_SPECIALS)) == [
        size + i for i in range(len(CHATGLM_SPECIALS))
    ]
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<unk>"
    # without encode_special_tokens, ChatGLM's code encodes "<|user|>" in text as plain text
    text = f"<|user|> {WORDS[0]}"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == _spm(folder).encode(text)
    assert (
        tokenizer.decode(
            [size + 1, size + 3, *_spm(folder).encode(WORDS[0])], skip_special_tokens=True
        )
        == WORDS[0]
    )


def test_chatglm_encode_special_tokens_matches_them_in_text(tmp_path):
    folder = checkpoint(tmp_path, "chatglm")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "encode_special_tokens": True})
    )
    size = _spm(folder).get_piece_size()
    ids = _load(folder)(f"<|user|> {WORDS[0]}", add_special_tokens=False)["input_ids"]
    assert ids[0] == size + CHATGLM_SPECIALS.index("<|user|>")


def test_internlm2_chat_template_uses_its_special_pieces(tmp_path):
    folder = checkpoint(tmp_path, "internlm2")
    sp = _spm(folder)
    tokenizer = _load(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": WORDS[0]}], add_generation_prompt=True, tokenize=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == sp.bos_id()
    assert ids.count(sp.piece_to_id("<|im_start|>")) == 2
    assert ids.count(sp.piece_to_id("<|im_end|>")) == 1


def test_qwen_encodes_as_tiktoken_does(tmp_path):
    import tiktoken

    folder = checkpoint(tmp_path, "qwen")
    ranks = qwen_ranks()
    reference = tiktoken.Encoding(
        "qwen-test",
        pat_str=QWEN_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(QWEN_SPECIALS)},
    )
    tokenizer = _load(folder)
    for text in QWEN_TEXTS:
        expected = reference.encode(text, allowed_special="all")
        assert tokenizer(text)["input_ids"] == expected, text
        assert tokenizer.decode(expected) == text
    assert tokenizer("12")["input_ids"] == [ranks[b"1"], ranks[b"2"]]  # QWen's pattern
    assert tokenizer.eos_token_id == len(ranks) == tokenizer.pad_token_id
    assert (
        tokenizer.decode(
            reference.encode(QWEN_TEXTS[2], allowed_special="all"), skip_special_tokens=True
        )
        == "user\nhi there\n"
    )


# ---- `rabbit generate` prints text; no vocabulary: one clear error -------------------------------
@pytest.mark.parametrize(
    ("family", "chat"),
    [
        ("baichuan", "--no-chat"),
        ("chatglm", "--no-chat"),
        ("chatglm", "--chat"),  # ChatGLM3's template
        ("internlm", "--no-chat"),
        ("internlm2", "--chat"),  # ChatML
        ("qwen", "--no-chat"),
    ],
)
def test_generate_prints_text(family, chat, tmp_path, capsys, monkeypatch, isolated_logging):
    from rabbitllm.cli import main

    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "cache"))
    folder = checkpoint(tmp_path, family)
    prompt = QWEN_TEXTS[0] if family == "qwen" else TEXTS[0]
    code = main(["generate", "--model", str(folder), prompt, "--max-new-tokens", "32", chat])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err and "error" not in captured.err.lower()
    text = captured.out.strip()
    assert text, f"{family}: no text printed"
    alphabet = set("".join(QWEN_BYTES)) if family == "qwen" else set("".join(CORPUS)) | {"⁇"}
    assert set(text) <= alphabet | {" "}, text
    assert not list(folder.glob("*.py"))


@pytest.mark.parametrize("family", ["baichuan", "chatglm", "internlm", "internlm2", "qwen"])
def test_no_vocabulary_names_the_file_and_trust_remote_code(
    family, tmp_path, capsys, monkeypatch, isolated_logging
):
    from rabbitllm.cli import main

    monkeypatch.setenv("RABBITLLM_CACHE", str(tmp_path / "cache"))
    folder = checkpoint(tmp_path, family, vocabulary=False)
    with pytest.raises(RemoteVocabularyError) as excinfo:
        _load(folder)
    vocab = "qwen.tiktoken" if family == "qwen" else "tokenizer.model"
    assert vocab in str(excinfo.value) and "--trust-remote-code" in str(excinfo.value)
    code = main(["generate", "--model", str(folder), "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rabbit: error: "), err
    assert vocab in err[0] and "--trust-remote-code" in err[0]


def test_a_tokenizer_json_without_the_vocabulary_file_is_read_by_transformers(tmp_path):
    """A re-upload that ships tokenizer.json with a class of transformers' own needs no code."""
    folder = checkpoint(tmp_path, "internlm")
    expected = [_load(folder)(text)["input_ids"] for text in TEXTS]
    _load(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer.model").unlink()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = _load(folder)
    assert [tokenizer(text)["input_ids"] for text in TEXTS] == expected


@pytest.mark.parametrize(
    ("family", "name", "data"),
    [
        ("internlm", "tokenizer.model", b"not a sentencepiece model"),
        ("qwen", "qwen.tiktoken", b"this is not base64 ranks\n"),
    ],
)
def test_unreadable_vocabulary_says_so(family, name, data, tmp_path):
    folder = checkpoint(tmp_path, family)
    (folder / name).write_bytes(data)
    with pytest.raises(RemoteVocabularyError, match="--trust-remote-code") as excinfo:
        _load(folder)
    assert f"{name}: transformers cannot build a tokenizer from it" in str(excinfo.value)


def test_unigram_sentencepiece_is_refused(tmp_path):
    folder = checkpoint(tmp_path, "internlm")
    unigram = train_spm(add_dummy_prefix=True, vocab_size=200, model_type="unigram")
    (folder / "tokenizer.model").write_bytes(unigram)
    with pytest.raises(RemoteVocabularyError, match="not BPE"):
        _load(folder)


def test_other_model_types_keep_autotokenizer(tmp_path):
    """A vocabulary beside a config of another model_type is not built by the family code."""
    folder = checkpoint(tmp_path, "internlm")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(TokenizerNotFoundError) as excinfo:
        _load(folder)  # AutoTokenizer: InternLMTokenizer is the checkpoint's code, not run
    assert not isinstance(excinfo.value, RemoteVocabularyError)


# ---- `rabbit inspect` names the family and its adapter -------------------------------------------
def _inspect(folder: Path, capsys, *extra: str) -> str:
    from rabbitllm.cli import main

    code = main(["inspect", str(folder), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.parametrize(
    ("family", "streamed_as"),
    [("qwen", "qwen2 (c_attn split"), ("baichuan_alibi", "ALiBi"), ("chatglm", "glm")],
)
def test_inspect_names_the_remote_family_and_adapter(family, streamed_as, capsys, isolated_logging):
    out = _inspect(FIXTURES / family, capsys)
    line = out.strip().splitlines()[-1]
    model_type = family.split("_")[0]
    assert line.startswith(
        f"family: {model_type} (the checkpoint's own code is not run; "
        f"adapter rabbit_models.remote.{family}: "
    ), line
    assert streamed_as in line, line
    assert json.loads(_inspect(FIXTURES / family, capsys, "--json"))["num_layers"] == 2


def test_inspect_names_transformers_families_and_says_nothing_of_unknown_ones(
    tmp_path, capsys, isolated_logging
):
    from rabbit_models.support import SUPPORT

    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copyfile(FIXTURES / "internlm" / "model.safetensors", folder / "model.safetensors")
    config = folder / "config.json"
    config.write_text(json.dumps({"model_type": "llama"}))
    out = _inspect(folder, capsys)
    assert out.strip().splitlines()[-1] == (
        "family: llama (transformers' own model; adapter rabbit_models.generic.GenericAdapter)"
    )
    refused = next(row for row in SUPPORT.values() if not row.supported)
    config.write_text(json.dumps({"model_type": refused.model_type}))
    line = _inspect(folder, capsys).strip().splitlines()[-1]
    assert line == f"family: {refused.model_type} (not supported: {refused.reason})"
    config.write_text(json.dumps({"model_type": "no-such-family"}))
    assert "family:" not in _inspect(folder, capsys)
