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


def _quantize_dequantize_(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                          zero_is_zero: bool, with_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``codes`` (x / scale, a buffer of its own) rounded, clamped and scaled back, in place; with
    ``with_mask``, also the mask of the codes within [qmin, qmax] before clamping (the STE's gradient)."""
    codes.round_()
    if not zero_is_zero:
        codes.add_(zero_point)
    inside = (codes >= qmin) & (codes <= qmax) if with_mask else None
    codes.clamp_(qmin, qmax)
    if not zero_is_zero:
        codes.sub_(zero_point)
    return codes.mul_(scale), inside


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gradient of a broadcast operand: ``t`` summed down to ``shape``."""
    return t.sum_to_size(shape) if t.shape != shape else t


class _FakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize that keeps little for its backward.

    Composed of autograd ops, one fake quantization keeps two full-size float tensors alive for the
    backward; on a 512x512 BEV map that is hundreds of MB per layer in every reconstruction step.
    Here a fixed step keeps a one-byte mask of the codes inside [qmin, qmax]; a learned (LSQ) step
    keeps the input, alive anyway as the previous layer's output, and recomputes the rounding.
    Gradients are the STE/LSQ ones: ``x`` passes where the code is inside the range; ``scale`` gets
    round(x/s) - x/s inside and the clamped code minus the zero point outside."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor, qmin: int, qmax: int, zero_is_zero: bool) -> torch.Tensor:
        ctx.qmin, ctx.qmax = qmin, qmax
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, scale, zero_point)
            return _quantize_dequantize_(x / scale, scale, zero_point, qmin, qmax, zero_is_zero)[0]
        out, inside = _quantize_dequantize_(x / scale, scale, zero_point, qmin, qmax, zero_is_zero, with_mask=True)
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[1]:
            (inside,) = ctx.saved_tensors
            return grad * inside, None, None, None, None, None
        x, scale, zero_point = ctx.saved_tensors
        codes = x / scale
        rounded = codes.round()
        shifted = rounded + zero_point
        inside = (shifted >= ctx.qmin) & (shifted <= ctx.qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        rounded.sub_(codes)  # the rounding residual where the code is inside the range
        outside = shifted.clamp_(ctx.qmin, ctx.qmax).sub_(zero_point)
        grad_scale = _sum_to(grad * torch.where(inside, rounded, outside), scale.shape)
        return grad_x, grad_scale, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  zero_is_zero: bool = False) -> torch.Tensor:
    """Quantize-dequantize with STE rounding; gradients reach ``x`` (in range) and ``scale`` (LSQ).

    Without autograd it works in place on one buffer (the same values: the STE's forward is exact
    rounding), which halves the memory traffic of judging and calibration passes at full size."""
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        return _quantize_dequantize_(x / scale, scale, zero_point, qmin, qmax, zero_is_zero)[0]
    if zero_point.requires_grad:  # a learned zero point: the composed ops carry its gradient
        codes = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
        return (codes - zero_point) * scale
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, zero_is_zero)


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
