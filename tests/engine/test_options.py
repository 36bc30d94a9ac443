from __future__ import annotations

import dataclasses

import pytest
import torch

from rabbit_engine.errors import InvalidOptionError
from rabbit_engine.options import StreamingOptions, parse_bytes, parse_device, parse_dtype


def test_dtype_strings():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    with pytest.raises(InvalidOptionError, match="dtype='float17'"):
        parse_dtype("float17")


def test_device_strings():
    assert parse_device("cpu").type == "cpu"
    with pytest.raises(InvalidOptionError, match="device='gpu0'"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidOptionError, match="CUDA"):
            parse_device("cuda")


@pytest.mark.parametrize(
    ("text", "size"),
    [("6GiB", 6 * 2**30), ("500MB", 500 * 10**6), ("1.5 GB", 1_500_000_000), (1024, 1024)],
)
def test_sizes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["lots", "-1GB", "6 GiBs", 0, True])
def test_bad_sizes_name_the_option(bad):
    with pytest.raises(InvalidOptionError, match="max_memory"):
        parse_bytes(bad)


def test_streaming_options_parse_once():
    opts = StreamingOptions.create(dtype="bf16", max_memory="1GiB", prefetch=0, device="cpu")
    assert opts.dtype is torch.bfloat16 and opts.max_memory == 2**30 and opts.prefetch == 0
    assert opts.device == torch.device("cpu") and opts.attn_implementation == "auto"
    assert StreamingOptions.create(max_memory=" AUTO ").max_memory == "auto"
    assert StreamingOptions.create().max_memory is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.prefetch = 3


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"prefetch": -1}, "prefetch"),
        ({"prefetch": 1.5}, "prefetch"),
        ({"prefetch": True}, "prefetch"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
        ({"profile": "yes"}, "profile"),
        ({"bit_exact": 1}, "bit_exact"),
        ({"max_memory": "lots"}, "max_memory"),
        ({"dtype": "float17"}, "dtype"),
        ({"device": "gpu0"}, "device"),
    ],
)
def test_streaming_options_name_the_bad_option(kwargs, option):
    with pytest.raises(InvalidOptionError, match=f"^{option}=") as info:
        StreamingOptions.create(**kwargs)
    assert info.value.option == option


def test_from_kwargs_takes_only_its_own_and_overrides_a_base():
    base = StreamingOptions.create(prefetch=4, profile=True)
    rest = {"prefetch": 1, "token": "x"}
    opts = StreamingOptions.from_kwargs(rest, base=base)
    assert (opts.prefetch, opts.profile) == (1, True)
    assert rest == {"token": "x"}
    assert set(StreamingOptions.names()) == {
        "device", "dtype", "attn_implementation", "max_memory", "prefetch", "profile", "bit_exact",
        "compression", "group_size",
    }  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, option, words",
    [
        ({"compression": "3bit"}, "compression", "'8bit', 'int8', '4bit', 'int4'"),
        ({"compression": 8}, "compression", "must be one of"),
        ({"group_size": 64}, "group_size", "no compression was asked for"),
        ({"compression": "8bit", "group_size": 64}, "group_size", "one scale per output channel"),
        ({"compression": "4bit", "group_size": 48}, "group_size", "32, 64, 128, 256"),
        ({"compression": "int4", "group_size": 64.0}, "group_size", "whole number"),
    ],
)
def test_compression_options_are_refused_with_the_choices(kwargs, option, words):
    with pytest.raises(InvalidOptionError, match=words) as info:
        StreamingOptions.create(**kwargs)
    assert info.value.option == option


def test_compression_spellings_and_group_size():
    assert StreamingOptions.create().compression is None
    assert StreamingOptions.create(compression="INT8").compression.name == "8bit"
    assert StreamingOptions.create(compression="4bit").compression.name == "4bit-g32"
    four = StreamingOptions.create(compression="int4", group_size=128)
    assert four.compression.name == "4bit-g128"
    # a group size given over a base keeps the base's bits
    regrouped = StreamingOptions.from_kwargs({"group_size": 64}, base=four)
    assert regrouped.compression.name == "4bit-g64"
