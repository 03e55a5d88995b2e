"""Fake-quant twins of torch layers.

Each twin *is* its float layer (a subclass sharing the same parameters, call
signature and state-dict keys) plus two quantizers named as in NVIDIA ModelOpt:
``weight_quantizer`` (per output channel) and ``input_quantizer`` (per tensor).
New layer types join through ``register_quant_module``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import FakeQuantizer, QuantMode
from .spec import QuantSpec

QUANT_MODULES: OrderedDict[type, type] = OrderedDict()


def register_quant_module(float_cls: type):
    """Declare the fake-quant twin of ``float_cls`` (used by ``lidar_ptq.quantize``)."""
    def wrap(quant_cls: type) -> type:
        QUANT_MODULES[float_cls] = quant_cls
        return quant_cls
    return wrap


def clone_as(cls: type, module: nn.Module) -> nn.Module:
    """An instance of ``cls`` (a subclass of ``type(module)``) sharing ``module``'s parameters,
    buffers, children and hooks: the swap keeps weights and state-dict keys without a copy."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for attr in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
        if attr in module.__dict__:
            twin.__dict__[attr] = OrderedDict(module.__dict__[attr])
    return twin


class QuantModuleMixin:
    """Adds weight/input quantizers to a float layer without touching its parameters.

    ``weight_axis`` is the output-channel axis of the weight; ``feature_axis`` the
    channel axis of the input (used by sparse observers to find active sites).
    """

    weight_axis: int = 0
    feature_axis: int = 1
    weight_in_axis: int | None = 1  # input-channel axis of the weight (None: no input equalization)
    weight_name: str = "weight"
    weight_quantizer: FakeQuantizer
    input_quantizer: FakeQuantizer

    @classmethod
    def from_float(cls, module: nn.Module, weight_spec: QuantSpec, input_spec: QuantSpec,
                   roles: dict[str, QuantSpec] | None = None) -> QuantModuleMixin:
        """Wrap ``module`` (its parameters are shared, not copied).

        ``roles`` carries specs of extra activation quantizers some twins have (attention)."""
        twin = clone_as(cls, module)
        twin.weight_quantizer = FakeQuantizer(weight_spec, channel_axis=cls.weight_axis)
        twin.input_quantizer = FakeQuantizer(input_spec, channel_axis=cls.feature_axis, feature_axis=cls.feature_axis)
        twin._init_extra_quantizers(roles or {}, input_spec)
        twin.to(twin.float_weight.device)
        return twin

    def _init_extra_quantizers(self, roles: dict[str, QuantSpec], input_spec: QuantSpec) -> None:
        """Twins with more than weight/input quantizers create them here."""

    @property
    def float_weight(self) -> nn.Parameter:
        """The parameter the weight quantizer quantizes."""
        return getattr(self, self.weight_name)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the integer engine will see it (float during calibration)."""
        if self.weight_quantizer.mode is QuantMode.CALIBRATE:
            return self.float_weight
        return self.weight_quantizer(self.float_weight)

    def prescale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / input_channel_scale`` per input channel when the layer was equalized (see
        ``lidar_ptq.quant.equalize``; the weight holds the inverse factors), else ``x``."""
        scale = self._buffers.get("input_channel_scale")
        if scale is None:
            return x
        shape = [1] * x.dim()
        shape[self.feature_axis] = -1
        return x / scale.reshape(shape)

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias plus the bias correction's ``bias_shift`` while quantizing; the float bias in FLOAT
        and CALIBRATE mode, so the float reference of later stages stays the float model's."""
        shift = self._buffers.get("bias_shift")
        if shift is None or self.weight_quantizer.mode is not QuantMode.QUANTIZE:
            return self.bias
        return self.bias + shift

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # optional buffers (equalization scales, bias shifts) are in a checkpoint that a fresh twin lacks
        for name in ("input_channel_scale", "bias_shift"):
            key = prefix + name
            if key in state_dict and name not in self._buffers:
                self.register_buffer(name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def calibrate_weight(self) -> None:
        """Weights are static: observe them once, independent of the data."""
        if self.weight_quantizer.enabled:
            self.weight_quantizer.observe(self.float_weight)


class _QuantConvForward(QuantModuleMixin):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(self.prescale_input(input))
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


@register_quant_module(nn.Conv1d)
class QuantConv1d(_QuantConvForward, nn.Conv1d):
    pass


@register_quant_module(nn.Conv2d)
class QuantConv2d(_QuantConvForward, nn.Conv2d):
    pass


@register_quant_module(nn.Conv3d)
class QuantConv3d(_QuantConvForward, nn.Conv3d):
    pass


@register_quant_module(nn.ConvTranspose2d)
class QuantConvTranspose2d(QuantModuleMixin, nn.ConvTranspose2d):
    """Transposed conv: weight is [in, out/groups, kH, kW], so output channels are axis 1."""

    weight_axis = 1
    weight_in_axis = 0

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        x = self.input_quantizer(self.prescale_input(input))
        return F.conv_transpose2d(x, self.quantized_weight(), self.quantized_bias(), self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)


@register_quant_module(nn.Linear)
class QuantLinear(QuantModuleMixin, nn.Linear):
    feature_axis = -1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(self.prescale_input(input))
        return F.linear(x, self.quantized_weight(), self.quantized_bias())
