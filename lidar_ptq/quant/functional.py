"""Stateless quantization math shared by quantizers and observers."""
from __future__ import annotations

import torch

from .spec import QuantSpec

# Smallest step we allow: an all-zero channel still gets a valid (tiny) scale.
MIN_SCALE = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (identity backward)."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def range_to_scale(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a clipping range [lo, hi] to (scale, zero_point) for ``spec``.

    Symmetric quantizers use amax = max(|lo|, |hi|) with zero point 0 (what TensorRT's
    explicit INT8 needs); asymmetric ones stretch the range to include 0 so that
    zero padding and empty sites stay exact.
    """
    lo = lo.float()
    hi = hi.float()
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs()) if spec.signed else hi.clamp(min=0)
        scale = (amax / spec.qmax).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo = lo.clamp(max=0)
    hi = hi.clamp(min=0)
    scale = ((hi - lo) / float(spec.qmax - spec.qmin)).clamp(min=MIN_SCALE)
    zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  zero_is_zero: bool = False) -> torch.Tensor:
    """Quantize-dequantize with STE rounding; gradients reach ``x`` (in range) and ``scale`` (LSQ).

    Without autograd it works in place on one buffer (the same values: the STE's forward is exact
    rounding), which halves the memory traffic of judging and calibration passes at full size."""
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        codes = x / scale
        codes.round_()
        if not zero_is_zero:
            codes.add_(zero_point)
        codes.clamp_(qmin, qmax)
        if not zero_is_zero:
            codes.sub_(zero_point)
        return codes.mul_(scale)
    codes = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (codes - zero_point) * scale


def fake_quantize_log2(x: torch.Tensor, amax: torch.Tensor, levels: int) -> torch.Tensor:
    """Log2 quantization of non-negative values: x ~ amax * 2^-code, code in [0, levels - 1].

    Suits long-tailed softmax outputs: fine steps near 0, coarse near 1. Codes past
    the last level become exactly 0 (the most common attention weight). STE gradient.
    """
    ratio = (x / amax).clamp(min=0)
    code = round_ste(-torch.log2(ratio.clamp(min=2.0 ** -(levels + 1))))
    value = amax * torch.pow(2.0, -code.clamp(min=0))
    return torch.where(code > levels - 1, torch.zeros_like(value), value)


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                    qmax: int) -> torch.Tensor:
    """Integer codes of ``x`` (int32), as an integer engine would store them."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def broadcast_shape(numel: int, ndim: int, axis: int | None) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``axis`` of an ``ndim`` tensor."""
    if axis is None:
        return []
    shape = [1] * ndim
    shape[axis % ndim] = numel
    return shape
