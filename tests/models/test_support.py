"""rabbit_models' support table: it covers transformers' causal-LM types, every supported type has
a tiny checkpoint that the parity tests run, and a refused type fails before any weight is read
(AutoModel and the CLI), with the table's reason."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from rabbit_engine.errors import UnsupportedModelError
from rabbit_models import SUPPORT, adapter_for
from rabbit_models.support import CHECKS, check_supported
from rabbitllm import AutoModel
from tests.models.families import FAMILIES, available_families, build_model, save_checkpoint

INSTALLED = Version(transformers.__version__)
# Refused types a config.json can name (code_llama is an alias: its checkpoints say "llama").
REFUSED = sorted(
    t
    for t, row in SUPPORT.items()
    if not row.supported and t in CONFIG_MAPPING and CONFIG_MAPPING[t].model_type == t
)
MULTI_READ_ROWS = sorted(t for t, row in SUPPORT.items() if row.extra_reads)
MULTI_READ = sorted(t for t in available_families() if SUPPORT[t].extra_reads)


def test_table_covers_exactly_the_causal_lm_types():
    """Every causal-LM type of this transformers has one row; a row outside its mapping belongs to
    another version (newer than this one, or one whose config this version no longer has)."""
    missing = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(SUPPORT))
    assert not missing, f"causal-LM types without a row in rabbit_models.support: {missing}"
    stray = sorted(
        t
        for t in set(SUPPORT) - set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        if t in CONFIG_MAPPING_NAMES and Version(SUPPORT[t].min_transformers) <= INSTALLED
    )
    assert not stray, (
        f"rows for types this transformers has but does not map to a causal LM: {stray}"
    )


def test_rows_are_well_formed():
    for model_type, row in SUPPORT.items():
        assert row.model_type == model_type
        if row.supported:  # every check passed, or the row says why one could not run
            assert set(row.checks) <= set(CHECKS), row
            assert (set(row.checks) == set(CHECKS)) == (not row.reason), row
        else:
            assert not row.checks and not row.extra_reads, row
            assert len(row.reason) > 20 and model_type not in FAMILIES, row


def test_every_supported_type_has_a_tiny_checkpoint():
    """The parity tests run over FAMILIES: a supported row without a family was never verified."""
    supported = {t for t, row in SUPPORT.items() if row.supported}
    assert supported == set(FAMILIES), (
        sorted(supported - set(FAMILIES)),
        sorted(set(FAMILIES) - supported),
    )
    new_enough = {t for t in supported if Version(SUPPORT[t].min_transformers) <= INSTALLED}
    assert set(available_families()) == new_enough & set(CONFIG_MAPPING_NAMES)


# Types whose default config does not validate: the overrides a released config has.
_CONFIG_FIXES = {
    "gemma4_assistant": dict(
        text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
    ),
    **{
        t: dict(
            text_encoder=dict(model_type="t5"),
            audio_encoder=dict(model_type="encodec"),
            decoder=dict(model_type=f"{t}_decoder"),
        )
        for t in ("musicgen", "musicgen_melody")
    },
}


def _refused_checkpoint(model_type: str, path, *, tokenizer: bool = True) -> None:
    """config.json of the type, a tokenizer, and weight files that cannot be read: only the table
    can answer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path.mkdir()
    AutoConfig.for_model(model_type, **_CONFIG_FIXES.get(model_type, {})).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors header
    if not tokenizer:
        return
    vocab = {"<unk>": 0, "hi": 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(path)


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_type_raises_before_any_weight_is_read(model_type, tmp_path):
    _refused_checkpoint(model_type, tmp_path / "ckpt")
    with pytest.raises(UnsupportedModelError) as info:
        AutoModel.from_pretrained(tmp_path / "ckpt")
    message = str(info.value)
    assert f"model_type={model_type!r}" in message
    assert SUPPORT[model_type].reason in message


def test_refused_type_is_refused_before_its_config_is_parsed(tmp_path):
    """A refused family whose config.json this transformers cannot even parse still gets the
    table's reason, not a config error."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = {"model_type": "xlm", "rope_scaling": 5}
    with pytest.raises(Exception):  # noqa: B017 - the premise: transformers refuses this config
        CONFIG_MAPPING["xlm"].from_dict(data)
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedModelError, match="model_type='xlm' is not supported"):
        AutoModel.from_pretrained(path)


@pytest.mark.parametrize("tokenizer", [True, False], ids=["with-tokenizer", "no-tokenizer"])
def test_cli_refuses_in_one_line_with_exit_2(tmp_path, tokenizer):
    """The refusal comes first, even when the model also lacks a tokenizer."""
    model_type = "whisper" if "whisper" in REFUSED else REFUSED[0]
    _refused_checkpoint(model_type, tmp_path / "ckpt", tokenizer=tokenizer)
    from tests.cli.conftest import base_env, run_rabbit

    proc = run_rabbit(
        ["generate", "hi", "--model", str(tmp_path / "ckpt")], base_env(tmp_path / "cache")
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rabbit: error: ") and f"model_type={model_type!r}" in lines[0]
    assert proc.stdout == ""


def test_multi_read_type_says_its_cost_once_at_load(tmp_path, caplog):
    """One log line at load for each multi-read type this transformers has (a loaded checkpoint),
    and for every multi-read row of the table (its config, on any transformers version)."""

    def support_lines() -> list[str]:  # (an older transformers adds an "unverified" line)
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "rabbit_models.support" and "read" in r.getMessage()
        ]

    assert MULTI_READ_ROWS
    for model_type in MULTI_READ_ROWS:
        config = FAMILIES["llama"].make_config()
        config.model_type = model_type  # check_supported reads only the model_type
        caplog.clear()
        with caplog.at_level(logging.INFO):
            check_supported(config)
        (line,) = support_lines()
        assert "more than one read per layer per token" in line
        assert SUPPORT[model_type].extra_reads in line
    for model_type in MULTI_READ:
        path = save_checkpoint(build_model(model_type), tmp_path / model_type, sharded=False)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            with AutoModel.from_pretrained(path, dtype=torch.float32):
                pass
        (line,) = support_lines()
        assert SUPPORT[model_type].extra_reads in line


def test_supported_type_loads_silently_and_unknown_type_is_tried_with_a_warning(caplog):
    with caplog.at_level(logging.INFO, logger="rabbit_models.support"):
        assert check_supported(FAMILIES["llama"].make_config()) is SUPPORT["llama"]
        assert not caplog.records
        config = FAMILIES["llama"].make_config()
        config.model_type = "llama_from_the_future"  # a type a newer transformers would add
        adapter_for(config)  # the generic adapter: no error
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "'llama_from_the_future'" in record.getMessage() and "unverified" in record.getMessage()


def test_readme_families_section_is_the_table():
    """README.md's section between the families-table markers is `support.markdown()`."""
    from pathlib import Path

    from rabbit_models.support import markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start, end = "<!-- families-table -->\n", "\n<!-- /families-table -->"
    section = readme[readme.index(start) + len(start) : readme.index(end)]
    assert section == markdown(), (
        "README.md: put rabbit_models.support.markdown() between the markers"
    )
