"""Make spconv 2's CPU build usable for calibration and reconstruction.

spconv 2.3's CPU path has two gaps (CUDA is left untouched):

* the backward of indice convolutions asks ``torch.cuda.current_stream()``
  unconditionally, which raises on CPU-only torch;
* in eval mode a conv with a bias or a fused activation asserts
  ``cpu don't support act and bias`` (a BN-folded sparse conv has a bias).

``enable_spconv_cpu_compat()`` patches two functions of ``spconv.pytorch.ops``
once: the stream query returns the null stream when torch has no CUDA, and CPU
features get bias and activation applied after the bias-free CPU kernel. CUDA
tensors always take spconv's own code.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import torch

_PATCHED_ATTR = "_lidar_ptq_cpu_compat"


def _apply_activation(out: torch.Tensor, act_type: Any, act_alpha: Any) -> torch.Tensor:
    name = getattr(act_type, "name", str(act_type))
    if name in ("None_", "None"):
        return out
    if name == "ReLU":
        return torch.relu(out)
    if name == "LeakyReLU":
        # spconv passes the activation enum as alpha in one call site; fall back to the usual slope.
        slope = float(act_alpha) if isinstance(act_alpha, numbers.Real) and act_alpha != 0 else 0.01
        return torch.nn.functional.leaky_relu(out, slope)
    if name == "Sigmoid":
        return torch.sigmoid(out)
    raise NotImplementedError(f"spconv CPU compat: activation {name} is not supported")


def _cpu_bias_act(indice_conv: Callable) -> Callable:
    @functools.wraps(indice_conv)
    def wrapped(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse=False,
                subm=False, algo=None, timer=None, bias=None, act_alpha=0.0, act_beta=0.0, act_type=None):
        kwargs = {} if algo is None else {"algo": algo}
        if timer is not None:
            kwargs["timer"] = timer
        act_name = getattr(act_type, "name", "None_")
        if features.is_cuda or (bias is None and act_name == "None_"):
            if act_type is not None:
                kwargs.update(act_alpha=act_alpha, act_beta=act_beta, act_type=act_type)
            return indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse,
                               subm, bias=bias, **kwargs)
        out = indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse, subm,
                          **kwargs)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return _apply_activation(out, act_type, act_alpha)

    setattr(wrapped, _PATCHED_ATTR, True)
    return wrapped


def _stream_or_null(get_current_stream: Callable[[], int]) -> Callable[[], int]:
    @functools.wraps(get_current_stream)
    def wrapped() -> int:
        return get_current_stream() if torch.cuda.is_available() else 0

    setattr(wrapped, _PATCHED_ATTR, True)
    return wrapped


def enable_spconv_cpu_compat() -> bool:
    """Install the CPU fixes into spconv (idempotent). Returns False if spconv is absent."""
    try:
        from spconv.pytorch import ops
    except ImportError:
        return False
    if not getattr(ops.indice_conv, _PATCHED_ATTR, False):
        ops.indice_conv = _cpu_bias_act(ops.indice_conv)
    if not getattr(ops.get_current_stream, _PATCHED_ATTR, False):
        ops.get_current_stream = _stream_or_null(ops.get_current_stream)
    return True
