"""rabbit_engine.quant: scheme parsing, packing for torch's CPU kernels, dequantization, compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rabbit_engine.errors import InvalidOptionError, WeightMismatchError
from rabbit_engine.quant import (
    COMPRESSION_CHOICES,
    DEFAULT_GROUP_SIZE,
    INT8_LAYOUT,
    CompressionScheme,
    CompressionSchemeError,
    PackedWeight,
    current_int4_layout,
    dequantize,
    int4_codes,
    kernel_fits,
    parse_compression,
    quantize,
    quantized_linear,
    repack_int4,
    unpack_int4_codes,
)
from rabbit_store.errors import InvalidCheckpointError, RabbitError

SCHEMES = {
    "8bit": CompressionScheme(bits=8),
    "4bit-g32": CompressionScheme(bits=4, group_size=32),
    "4bit-g64": CompressionScheme(bits=4, group_size=64),
    "4bit-g128": CompressionScheme(bits=4, group_size=128),
}
U32 = 2.0**-24  # fp32 unit roundoff
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def weight(out_f: int = 96, in_f: int = 256, *, seed: int = 0, dtype=torch.bfloat16):
    """A weight with the awkward groups real checkpoints have: an offset row, a constant row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[1] += 3.0  # all-positive groups far from zero: the zero point's rounding matters
    w[2] = 0.25  # a constant row: zero range, the scale floors at the dtype's tiny
    return w.to(dtype)


# --- scheme -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bits"), [("8bit", 8), ("int8", 8), ("4bit", 4), ("int4", 4), (" INT4 ", 4)]
)
def test_parse_compression_spellings(value, bits):
    scheme = parse_compression(value)
    assert scheme.bits == bits
    assert scheme.group_size == (DEFAULT_GROUP_SIZE if bits == 4 else None)
    assert scheme.scale_dtype == "bfloat16"


def test_parse_compression_group_size_and_passthrough():
    scheme = parse_compression("4bit", group_size=128, scale_dtype="float32")
    assert scheme == CompressionScheme(bits=4, group_size=128, scale_dtype="float32")
    assert parse_compression(scheme) is scheme
    assert scheme.name == "4bit-g128"


@pytest.mark.parametrize("value", ["3bit", "fp8", "", "8-bit", None, 8])
def test_parse_compression_refuses_unknown_values_listing_choices(value):
    with pytest.raises(InvalidOptionError) as info:
        parse_compression(value)
    assert info.value.option == "compression"
    for choice in COMPRESSION_CHOICES:
        assert repr(choice) in str(info.value)


def test_parse_compression_refuses_bad_group_size_and_scale_dtype():
    with pytest.raises(InvalidOptionError, match="group_size must be one of 32, 64, 128, 256") as e:
        parse_compression("4bit", group_size=48)
    assert e.value.option == "group_size"
    with pytest.raises(InvalidOptionError, match="per output channel") as e:
        parse_compression("8bit", group_size=64)
    assert e.value.option == "group_size"
    with pytest.raises(InvalidOptionError, match="scale_dtype") as e:
        parse_compression("8bit", scale_dtype="float64")
    assert e.value.option == "scale_dtype"


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_scheme_dict_round_trip_is_stable_json(scheme):
    data = json.loads(json.dumps(scheme.to_dict()))
    assert CompressionScheme.from_dict(data) == scheme
    assert list(data) == ["version", "method", "bits", "group_size", "scale_dtype"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"zero_point_dtype": "int8"}, "zero_point_dtype"),
        ({"version": 2}, "version"),
        ({"bits": 3}, "bits"),
        ({"group_size": 100}, "group_size"),
        ({"scale_dtype": "float8"}, "scale_dtype"),
        ({"method": "int4-groupwise-symmetric"}, "method"),
    ],
)
def test_scheme_from_dict_refuses_what_it_does_not_know(change, field):
    data = {**SCHEMES["4bit-g64"].to_dict(), **change}
    with pytest.raises(CompressionSchemeError) as info:
        CompressionScheme.from_dict(data)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, InvalidCheckpointError | RabbitError)


def test_scheme_from_dict_refuses_missing_field():
    data = SCHEMES["8bit"].to_dict()
    del data["scale_dtype"]
    with pytest.raises(CompressionSchemeError, match="lacks field 'scale_dtype'"):
        CompressionScheme.from_dict(data)


# --- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(SCHEMES))
def test_packing_is_deterministic_and_in_the_kernel_layout(label):
    scheme = SCHEMES[label]
    w = weight()
    threads = torch.get_num_threads()
    first = quantize(w, scheme)
    torch.set_num_threads(1)
    try:
        second = quantize(w, scheme)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first.qweight, second.qweight)
    assert torch.equal(first.scales, second.scales)
    assert first.qweight.is_contiguous() and first.scales.is_contiguous()
    assert first.scales.dtype == torch.bfloat16
    if scheme.bits == 8:
        assert first.layout == INT8_LAYOUT
        assert (first.qweight.dtype, first.qweight.shape) == (torch.int8, (96, 256))
        assert first.scales.shape == (96,)
    else:
        assert first.layout == current_int4_layout()
        assert (first.qweight.dtype, first.qweight.shape) == (torch.uint8, (96, 128))
        assert first.scales.shape == (256 // scheme.group_size, 96, 2)
    assert first.nbytes == first.qweight.nbytes + first.scales.nbytes


def test_int8_error_is_at_most_half_a_step_per_channel():
    w = weight()
    packed = quantize(w, SCHEMES["8bit"])
    deq = dequantize(packed)
    scale = packed.scales.float()[:, None]
    # The stored scale is rounded up, so |w / scale| <= 127 and no code is clamped; the only
    # slack is fp32's rounding of w / scale (relative 2^-24).
    assert ((w.float() - deq).abs() <= scale / 2 * (1 + 2**-20)).all()
    assert packed.qweight.abs().max() <= 127


@pytest.mark.parametrize("label", ["4bit-g32", "4bit-g64", "4bit-g128"])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16", "float32"])
def test_int4_error_is_at_most_half_a_step_per_group(label, scale_dtype):
    g = SCHEMES[label].group_size
    scheme = CompressionScheme(bits=4, group_size=g, scale_dtype=scale_dtype)
    w = weight(dtype=torch.float32)
    packed = quantize(w, scheme)
    deq = dequantize(packed)
    scale = packed.scales[..., 0].float().t().repeat_interleave(g, dim=1)  # [out, in]
    zero = packed.scales[..., 1].float().t().repeat_interleave(g, dim=1)
    # Half a step, plus fp32 rounding of (code - 8) * scale + zero (relative to |zero|).
    bound = scale / 2 * (1 + 2**-20) + zero.abs() * 4 * U32
    assert ((w - deq).abs() <= bound).all()
    codes = int4_codes(packed)
    assert codes.max() <= 15


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16"])
def test_int8_dequantize_in_the_scale_dtype_equals_the_fp32_path_cast(scale_dtype):
    dtype = getattr(torch, scale_dtype)
    for w in (weight(), torch.stack([weight(32, 64, seed=e) for e in range(3)])):
        packed = quantize(w, CompressionScheme(bits=8, scale_dtype=scale_dtype))
        assert torch.equal(dequantize(packed, dtype=dtype), dequantize(packed).to(dtype))


@pytest.mark.parametrize(
    ("shape", "scheme", "error", "match"),
    [
        ((96, 200), SCHEMES["4bit-g64"], InvalidOptionError, r"\(96, 200\).*group_size 64"),
        ((40, 256), SCHEMES["4bit-g32"], InvalidOptionError, r"\(40, 256\).*multiple of 16"),
        ((256,), SCHEMES["8bit"], ValueError, r"\(256,\)"),
        ((2, 2, 32, 64), SCHEMES["4bit-g32"], ValueError, r"\(2, 2, 32, 64\)"),
        ((0, 64), SCHEMES["8bit"], ValueError, r"\(0, 64\).*empty"),
    ],
)
def test_bad_shapes_are_refused_naming_the_tensor(shape, scheme, error, match):
    with pytest.raises(error, match=match) as info:
        quantize(torch.zeros(shape), scheme, name="model.layers.0.mlp.up_proj.weight")
    assert "model.layers.0.mlp.up_proj.weight" in str(info.value)


def test_non_float_and_non_finite_weights_are_refused():
    with pytest.raises(ValueError, match="dtype torch.int64"):
        quantize(torch.zeros(16, 64, dtype=torch.int64), SCHEMES["8bit"])
    w = weight(dtype=torch.float32)
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"'w'.*NaN"):
        quantize(w, SCHEMES["4bit-g32"], name="w")


# --- compute ----------------------------------------------------------------------------------


def oracle_tolerance(x, deq, y_ref, bias, out_dtype):
    """Bound on |quantized_linear(x) - F.linear(x, dequantize(packed))| per output element.

    Both sides multiply the same x by the same weights (dequantize returns exactly what the
    kernel multiplies by, in fp32) and both accumulate the K products in fp32, in different
    orders (the kernel blocks K and uses FMA; the int8 kernel applies the scale after the sum).
    Recursive summation errs by at most (K - 1) u sum|x_k w_k| for u = 2^-24, so the two differ
    by at most 2 (K + 1) u S with S = |x| @ |W|^T (one more u per term for the scale or FMA);
    we allow 3 (K + 1) u S. The kernel then rounds its result to the activation dtype
    (relative u_out: 2^-8 in bf16, 2^-24 in fp32), and once more after adding the bias.
    """
    k = x.shape[-1]
    s = F.linear(x.float().abs(), deq.abs())
    magnitude = y_ref.abs() + (bias.float().abs() if bias is not None else 0)
    return 3 * (k + 1) * U32 * s + 2 * UNIT_ROUNDOFF[out_dtype] * magnitude


@pytest.mark.parametrize("label", list(SCHEMES))
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_quantized_linear_matches_dequantized_linear(label, lead, dtype, with_bias):
    packed = quantize(weight(), SCHEMES[label])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 256, generator=g).to(dtype)
    bias = (torch.randn(96, generator=g)).to(dtype) if with_bias else None
    assert kernel_fits(packed, x)  # the aten kernel runs, not the dequantizing fallback
    y = quantized_linear(x, packed, bias)
    deq = dequantize(packed)
    y_ref = F.linear(x.float(), deq, None if bias is None else bias.float())
    assert y.shape == (*lead, 96) and y.dtype == dtype
    tol = oracle_tolerance(x, deq, y_ref, bias, dtype)
    assert ((y.float() - y_ref).abs() <= tol).all()
    # and the tolerance is tight enough to catch a wrong weight: the unquantized one
    y_float = F.linear(x.float(), weight().float(), None if bias is None else bias.float())
    assert ((y_float - y_ref).abs() > tol).any()


@pytest.mark.parametrize("label", ["8bit", "4bit-g32"])
def test_quantized_linear_falls_back_to_dequantize_where_no_kernel_fits(label):
    packed = quantize(weight(), SCHEMES[label])
    x = torch.randn(3, 256, dtype=torch.float64)
    assert not kernel_fits(packed, x)
    expected = F.linear(x, dequantize(packed, dtype=torch.float64))
    assert torch.equal(quantized_linear(x, packed), expected)


def test_quantized_linear_handles_non_contiguous_and_empty_inputs():
    packed = quantize(weight(), SCHEMES["4bit-g64"])
    x = torch.randn(256, 4).t()  # last dim strided
    assert torch.allclose(quantized_linear(x, packed), quantized_linear(x.contiguous(), packed))
    assert quantized_linear(torch.zeros(0, 256), packed).shape == (0, 96)


def test_quantized_linear_refuses_wrong_shapes():
    packed = quantize(weight(), SCHEMES["8bit"])
    with pytest.raises(ValueError, match=r"\(4, 128\).*\(96, 256\)"):
        quantized_linear(torch.zeros(4, 128), packed)
    experts = quantize(torch.randn(2, 32, 64), SCHEMES["8bit"])
    with pytest.raises(ValueError, match=r"\(2, 32, 64\).*expert"):
        quantized_linear(torch.zeros(1, 64), experts)


# --- MoE experts, storage, layouts ------------------------------------------------------------


@pytest.mark.parametrize("label", ["8bit", "4bit-g32", "4bit-g128"])
def test_expert_stack_packs_and_dequantizes_per_expert(label):
    scheme = SCHEMES[label]
    stack = torch.stack([weight(32, 128, seed=e) for e in range(4)])
    packed = quantize(stack, scheme, name="mlp.experts.gate_up_proj")
    assert packed.num_experts == 4 and packed.shape == (4, 32, 128)
    deq = dequantize(packed, dtype=torch.bfloat16)
    assert deq.shape == (4, 32, 128) and deq.dtype == torch.bfloat16
    x = torch.randn(3, 128, dtype=torch.float32)
    for e in range(4):
        alone = quantize(stack[e], scheme)
        assert torch.equal(packed.qweight[e], alone.qweight)
        assert torch.equal(packed.scales[e], alone.scales)
        assert torch.equal(deq[e], dequantize(alone, dtype=torch.bfloat16))
        y = quantized_linear(x, packed.expert(e))
        y_ref = F.linear(x, dequantize(alone))
        assert (
            (y - y_ref).abs() <= oracle_tolerance(x, dequantize(alone), y_ref, None, torch.float32)
        ).all()


@pytest.mark.parametrize("label", list(SCHEMES))
def test_packed_tensors_round_trip_through_safetensors(tmp_path, label):
    scheme = SCHEMES[label]
    packed = quantize(torch.stack([weight(32, 128, seed=e) for e in range(2)]), scheme)
    two_d = quantize(weight(), scheme)
    tensors = {f"experts.{k}": v for k, v in packed.tensors().items()}
    tensors |= {f"proj.{k}": v for k, v in two_d.tensors().items()}
    save_file(tensors, tmp_path / "layer.safetensors")
    loaded = load_file(tmp_path / "layer.safetensors")
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value)
    back = PackedWeight.from_tensors(
        scheme,
        two_d.shape,
        two_d.layout,
        {k.removeprefix("proj."): v for k, v in loaded.items() if k.startswith("proj.")},
    )
    assert torch.equal(dequantize(back), dequantize(two_d))


def test_from_tensors_refuses_mismatched_tensors():
    packed = quantize(weight(), SCHEMES["4bit-g64"])
    with pytest.raises(WeightMismatchError, match=r"'q_proj'.*scales.*expected \(4, 96, 2\)"):
        PackedWeight.from_tensors(
            SCHEMES["4bit-g64"],
            packed.shape,
            packed.layout,
            {"qweight": packed.qweight, "scales": packed.scales[:2]},
            name="q_proj",
        )
    with pytest.raises(WeightMismatchError, match="lacks its 'scales'"):
        PackedWeight.from_tensors(
            SCHEMES["8bit"],
            (96, 256),
            INT8_LAYOUT,
            {"qweight": torch.zeros(96, 256, dtype=torch.int8)},
        )


_PACK_IN_CHILD = """
import sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(3)
codes = torch.randint(0, 16, (112, 64), generator=g, dtype=torch.int32)
packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
save_file({"codes": codes.to(torch.uint8), "packed": packed}, sys.argv[1],
          metadata={"capability": torch.backends.cpu.get_cpu_capability()})
"""


def test_int4_layouts_of_every_capability_this_cpu_runs_unpack_exactly(tmp_path):
    """Pack under each ATen capability up to this CPU's (112 rows: full and short blocks)."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    mine = torch.backends.cpu.get_cpu_capability()
    capabilities = order[: order.index(mine) + 1]
    for capability in capabilities:
        out = tmp_path / f"{capability}.safetensors"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
        subprocess.run([sys.executable, "-c", _PACK_IN_CHILD, str(out)], check=True, env=env)
        from safetensors import safe_open

        with safe_open(out, "pt") as f:
            assert f.metadata()["capability"] == capability
        tensors = load_file(out)
        layout = "int4pack_cpu:" + capability
        assert torch.equal(unpack_int4_codes(tensors["packed"], layout), tensors["codes"])
    if len(capabilities) > 1:  # the layouts really differ, so the tag is needed
        first = load_file(tmp_path / f"{capabilities[0]}.safetensors")["packed"]
        last = load_file(tmp_path / f"{capabilities[-1]}.safetensors")["packed"]
        assert not torch.equal(first, last)


def test_unknown_int4_layout_is_refused():
    with pytest.raises(InvalidOptionError, match="'int4pack_cpu:SVE256'"):
        unpack_int4_codes(torch.zeros(16, 8, dtype=torch.uint8), "int4pack_cpu:SVE256")


def test_repack_moves_a_foreign_int4_layout_to_this_cpu():
    """A split packed on another CPU: the kernel is not used on it until repacked."""
    packed = quantize(weight(), SCHEMES["4bit-g32"])
    codes = int4_codes(packed)
    # The DEFAULT layout (pairs of rows per byte), built by hand: a foreign CPU's bytes.
    foreign_bytes = (codes[1::2] << 4 | codes[0::2]).view(3, 16, 256).transpose(1, 2)
    foreign_bytes = foreign_bytes.reshape(96, 128).contiguous()
    foreign = PackedWeight(
        packed.scheme, packed.shape, foreign_bytes, packed.scales, "int4pack_cpu:DEFAULT"
    )
    assert torch.equal(int4_codes(foreign), codes)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    if packed.layout != foreign.layout:
        assert not kernel_fits(foreign, x)
    repacked = repack_int4(foreign)
    assert repacked.layout == current_int4_layout()
    assert torch.equal(repacked.qweight, packed.qweight)
    assert torch.equal(quantized_linear(x, repacked), quantized_linear(x, packed))


def test_compressed_split_puts_every_packed_tensor_on_a_64_byte_boundary(tmp_path):
    """torch's int8 kernel crashed (general protection fault) on a weight at 8 mod 64 in a split
    written without alignment: the writer starts the data on a 64-byte boundary and orders the
    tensors so that the packed ones stay there."""
    import json
    import struct

    from rabbit_engine.quant import compress_checkpoint
    from tests.models.families import build_model, save_checkpoint

    source = save_checkpoint(
        build_model("llama", dtype=torch.bfloat16), tmp_path / "src", sharded=False
    )
    for compression in ("8bit", "4bit"):
        dest = tmp_path / compression
        compress_checkpoint(source, dest, compression, progress=False)
        packed = 0
        for file in sorted(dest.glob("layer-*.safetensors")):
            with open(file, "rb") as handle:
                length = struct.unpack("<Q", handle.read(8))[0]
                header = json.loads(handle.read(length))
            for name, entry in header.items():
                if name.endswith((".qweight", ".scales")):
                    packed += 1
                    assert (8 + length + entry["data_offsets"][0]) % 64 == 0, (file.name, name)
        assert packed == 2 * 7 * 2  # 7 linears per layer, 2 layers
