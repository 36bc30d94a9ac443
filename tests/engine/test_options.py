from __future__ import annotations

import pytest
import torch

from rabbit_engine.errors import InvalidOptionError
from rabbit_engine.options import parse_bytes, parse_device, parse_dtype


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
