"""`CompressedLinear`: the module that replaces an `nn.Linear` of a streamed layer whose weight is
stored compressed, so the layer's forward runs on the packed weight with no dequantization.

It holds the kernel's tensors as buffers (`qweight`, `scales`), which the weight map fills and
releases like any other tensor of the layer; the bias, if any, stays a float parameter. Everything
transformers' code asks of a linear layer in a forward (`module(x)`, `in_features`,
`out_features`) it answers; `weight` is not there on purpose: code that reads it would compute
with a weight that does not exist, and fails loudly instead.
"""

from __future__ import annotations

import torch

from rabbit_engine.quant.compute import quantized_linear
from rabbit_engine.quant.packing import PackedWeight, packed_specs
from rabbit_store.compression import CompressionScheme

__all__ = ["CompressedLinear"]


class CompressedLinear(torch.nn.Module):
    """y = x W^T + b with W packed by `rabbit_engine.quant.packing.quantize`."""

    def __init__(self, linear: torch.nn.Linear, scheme: CompressionScheme, layout: str) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.scheme = scheme
        self.layout = layout  # the byte order `qweight` holds once loaded (this CPU's)
        shape = (self.out_features, self.in_features)
        for name, (spec_shape, dtype) in packed_specs(scheme, shape).items():
            self.register_buffer(name, torch.empty(spec_shape, dtype=dtype, device="meta"))
        self.bias = linear.bias  # a (meta) Parameter or None, filled like any other weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = PackedWeight(
            self.scheme,
            (self.out_features, self.in_features),
            self.qweight,
            self.scales,
            self.layout,
        )
        return quantized_linear(x, packed, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compression={self.scheme.name}"
        )
