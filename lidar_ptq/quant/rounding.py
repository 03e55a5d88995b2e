"""Learned weight rounding for reconstruction: AdaRound and FlexRound.

A rounding module plugs into ``FakeQuantizer.rounding`` and replaces
round-to-nearest while a unit is reconstructed; ``bake_rounding`` then writes
the hard-rounded weight back (exactly on the integer grid) and removes it, so
the deployed model is plain nearest rounding of an on-grid weight.
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import round_ste
from .quantizer import FakeQuantizer


class AdaRound(nn.Module):
    """AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

    code = floor(w/s) + h(alpha), with the rectified sigmoid
    h = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1). alpha starts where
    h equals the fractional part of w/s, so the soft weight starts exactly at w.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1) -> None:
        super().__init__()
        self.zeta, self.gamma = zeta, gamma
        scaled = weight.detach() / scale
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(1e-6, 1 - 1e-6)
        self.register_buffer("initial_rest", rest, persistent=False)  # nearest rounding: rest >= 0.5
        self.alpha = nn.Parameter(-torch.log((zeta - gamma) / (rest - gamma) - 1))
        self.hard = False

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                qmax: int) -> torch.Tensor:
        up = (self.alpha >= 0).to(x.dtype) if self.hard else self.h()
        codes = torch.clamp(self.floor + up + zero_point, qmin, qmax)
        return (codes - zero_point) * scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """Pushes every h to 0 or 1; weight it with lambda and anneal beta from high to low."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class FlexRound(nn.Module):
    """FlexRound (Lee et al., 2023): round w / (s * exp(S + r)) with learned element-wise S and
    per-output-channel r, and a learnable grid size s; starts at round-to-nearest (S = r = 0)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.log(scale.detach().clone()))
        self.element = nn.Parameter(torch.zeros_like(weight))
        self.channel = nn.Parameter(torch.zeros_like(scale.detach()))
        self.hard = False

    def forward(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                qmax: int) -> torch.Tensor:
        grid = torch.exp(self.log_scale)
        divisor = grid * torch.exp(self.element + self.channel)
        rounded = torch.round(x / divisor) if self.hard else round_ste(x / divisor)
        codes = torch.clamp(rounded + zero_point, qmin, qmax)
        return (codes - zero_point) * grid

    def learned_scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale.detach())


ROUNDINGS = {"adaround", "flexround", "nearest"}


def attach_rounding(quantizer: FakeQuantizer, weight: torch.Tensor, method: str) -> nn.Module | None:
    """Give a calibrated weight quantizer a learnable rounding (``nearest`` attaches none)."""
    if method not in ROUNDINGS:
        raise ValueError(f"unknown rounding {method!r}; choose from {sorted(ROUNDINGS)}")
    if method == "nearest" or not quantizer.enabled:
        return None
    quantizer._require_calibrated()
    scale = quantizer._broadcast(quantizer.scale.detach(), weight)
    if method == "adaround":
        quantizer.rounding = AdaRound(weight, scale)
    else:
        quantizer.rounding = FlexRound(weight, scale)
    return quantizer.rounding


@torch.no_grad()
def bake_rounding(quantizer: FakeQuantizer, weight: nn.Parameter) -> None:
    """Write the hard-rounded weight into ``weight`` (on the grid) and drop the rounding module."""
    rounding = quantizer.rounding
    if rounding is None:
        return
    rounding.hard = True
    quantized = quantizer(weight)  # hard codes on the rounding's grid (FlexRound's learned one)
    if isinstance(rounding, FlexRound):
        quantizer._assign(rounding.learned_scale().reshape(quantizer.scale.shape), quantizer.zero_point)
    weight.copy_(quantized)
    quantizer.rounding = None
