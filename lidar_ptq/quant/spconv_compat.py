"""Make spconv 2's CPU build usable for calibration and reconstruction.

spconv 2.3's CPU path has three problems (CUDA is left untouched):

* the backward of indice convolutions asks ``torch.cuda.current_stream()``
  unconditionally, which raises on CPU-only torch;
* in eval mode a conv with a bias or a fused activation asserts
  ``cpu don't support act and bias`` (a BN-folded sparse conv has a bias);
* its CPU gather/scatter kernels race when several OpenMP threads run: measured
  here, 24 of 400 identical stride-2 forwards on 2 threads gave different
  features (none on 1 thread).

``enable_spconv_cpu_compat()`` patches ``spconv.pytorch.ops`` once: for CPU
tensors the indice convolution and its backward run as a plain torch
gather-GEMM-scatter over spconv's own indice pairs (deterministic, still
multi-threaded GEMMs), with bias and activation applied after; the stream query
returns the null stream when torch has no CUDA. CUDA tensors always take
spconv's own code.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Iterator

import torch

_PATCHED_ATTR = "_lidar_ptq_cpu_compat"


def _offset_pairs(indice_pairs: torch.Tensor, indice_pair_num: torch.Tensor, inverse: bool,
                  subm: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(kernel offset, input rows, output rows) for every offset with pairs, in spconv's layout.

    ``indice_pairs`` is [2, K, N]; row 0 holds input and row 1 output indices of
    the forward conv (swapped for an inverse conv). A submanifold conv handles
    its centre offset as a dense GEMM and stores pair counts only for the first
    half of the kernel: offset k > centre mirrors the count of K - 1 - k.
    """
    kv = indice_pairs.shape[1]
    center = kv // 2
    counts = indice_pair_num.tolist()
    src, dst = int(inverse), int(not inverse)
    for k in range(kv):
        if subm and k == center:
            continue
        n = counts[kv - 1 - k] if subm and k > center else counts[k]
        if n > 0:
            yield k, indice_pairs[src, k, :n].long(), indice_pairs[dst, k, :n].long()


def _per_offset_weights(filters: torch.Tensor) -> torch.Tensor:
    """spconv 2 weights [out, k..., in] as [out, K, in]."""
    return filters.reshape(filters.shape[0], -1, filters.shape[-1])


def cpu_indice_conv(features: torch.Tensor, filters: torch.Tensor, indice_pairs: torch.Tensor,
                    indice_pair_num: torch.Tensor, num_activate_out: int, inverse: bool = False,
                    subm: bool = False) -> torch.Tensor:
    """Sparse convolution as gather -> GEMM -> index_add over the precomputed indice pairs."""
    weight = _per_offset_weights(filters)
    if subm:
        out = features @ weight[:, weight.shape[1] // 2].t()
    else:
        out = features.new_zeros(num_activate_out, weight.shape[0])
    for k, rows_in, rows_out in _offset_pairs(indice_pairs, indice_pair_num, inverse, subm):
        out.index_add_(0, rows_out, features.index_select(0, rows_in) @ weight[:, k].t())
    return out


def cpu_indice_conv_backward(features: torch.Tensor, filters: torch.Tensor, out_bp: torch.Tensor,
                             indice_pairs: torch.Tensor, indice_pair_num: torch.Tensor, inverse: bool = False,
                             subm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. input features and filters of ``cpu_indice_conv``."""
    weight = _per_offset_weights(filters)
    grad_weight = torch.zeros_like(weight)
    if subm:
        center = weight.shape[1] // 2
        grad_in = out_bp @ weight[:, center]
        grad_weight[:, center] = out_bp.t() @ features
    else:
        grad_in = torch.zeros_like(features)
    for k, rows_in, rows_out in _offset_pairs(indice_pairs, indice_pair_num, inverse, subm):
        grad_out_k = out_bp.index_select(0, rows_out)
        grad_in.index_add_(0, rows_in, grad_out_k @ weight[:, k])
        grad_weight[:, k] = grad_out_k.t() @ features.index_select(0, rows_in)
    return grad_in, grad_weight.reshape(filters.shape)


def _apply_activation(out: torch.Tensor, act_type: Any, act_alpha: Any) -> torch.Tensor:
    name = getattr(act_type, "name", "None_")
    if name == "None_":
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


def _mark(fn: Callable) -> Callable:
    setattr(fn, _PATCHED_ATTR, True)
    return fn


def _patched_indice_conv(original: Callable) -> Callable:
    @functools.wraps(original)
    def indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse=False,
                    subm=False, *args, bias=None, act_alpha=0.0, act_beta=0.0, act_type=None, **kwargs):
        if features.is_cuda:
            if act_type is not None:
                kwargs.update(act_alpha=act_alpha, act_beta=act_beta, act_type=act_type)
            return original(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse, subm,
                            *args, bias=bias, **kwargs)
        out = cpu_indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse, subm)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return _apply_activation(out, act_type, act_alpha)

    return _mark(indice_conv)


def _patched_indice_conv_backward(original: Callable) -> Callable:
    @functools.wraps(original)
    def indice_conv_backward(features, filters, out_bp, indice_pairs, indice_pair_num, inverse=False,
                             subm=False, *args, **kwargs):
        if features.is_cuda:
            return original(features, filters, out_bp, indice_pairs, indice_pair_num, inverse, subm, *args,
                            **kwargs)
        return cpu_indice_conv_backward(features, filters, out_bp.contiguous(), indice_pairs, indice_pair_num,
                                        inverse, subm)

    return _mark(indice_conv_backward)


def _patched_stream(original: Callable[[], int]) -> Callable[[], int]:
    @functools.wraps(original)
    def get_current_stream() -> int:
        return original() if torch.cuda.is_available() else 0

    return _mark(get_current_stream)


def enable_spconv_cpu_compat() -> bool:
    """Install the CPU fixes into spconv (idempotent). Returns False if spconv is absent."""
    try:
        from spconv.pytorch import ops
    except ImportError:
        return False
    patches = {"indice_conv": _patched_indice_conv, "indice_conv_backward": _patched_indice_conv_backward,
               "get_current_stream": _patched_stream}
    for name, patch in patches.items():
        current = getattr(ops, name)
        if not getattr(current, _PATCHED_ATTR, False):
            setattr(ops, name, patch(current))
    return True
