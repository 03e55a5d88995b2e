"""mmcv's deformable convolution (the DCN heads of CenterPoint) as standard ops, quantized.

A deformable 3x3 conv samples its input at K = 9 learned positions per output
site and sums them through the kernel. Written as bilinear sampling
(``grid_sample``, ONNX ``GridSample``) followed by a 1x1 convolution over the
K samples, it needs no custom op: ONNX Runtime verifies it, TensorRT (8.6+)
runs the sampling natively and the 1x1 conv in INT8 with the Q/DQ pair
placed right before it. mmcv's ``MMCVDeformConv2d`` op, by contrast, runs in
neither without a plugin. The offsets come from the layer's own
``conv_offset`` convolution, which is quantized like any conv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmcv.ops import DeformConv2d, DeformConv2dPack

from ..quant.modules import QuantModuleMixin, register_quant_module


def sample_kernel_positions(x: torch.Tensor, offset: torch.Tensor, kernel_size: tuple[int, int],
                            stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                            deform_groups: int) -> torch.Tensor:
    """``[N, C*K, Ho, Wo]``: the input bilinearly sampled at every output site's K deformed kernel
    positions (mmcv's offset layout: per deform group, per kernel position, (dy, dx); samples outside
    the map read zeros), channel-major so a ``[O, C*K, 1, 1]`` kernel sums them as the deformable conv does."""
    n, channels, height, width = x.shape
    kh, kw = kernel_size
    ho, wo = offset.shape[-2:]
    k = kh * kw
    ky, kx = torch.meshgrid(torch.arange(kh, device=x.device, dtype=x.dtype) * dilation[0],
                            torch.arange(kw, device=x.device, dtype=x.dtype) * dilation[1], indexing="ij")
    oy = torch.arange(ho, device=x.device, dtype=x.dtype) * stride[0] - padding[0]
    ox = torch.arange(wo, device=x.device, dtype=x.dtype) * stride[1] - padding[1]
    base_y = ky.reshape(k, 1, 1) + oy.reshape(1, ho, 1)  # [K, Ho, 1]
    base_x = kx.reshape(k, 1, 1) + ox.reshape(1, 1, wo)  # [K, 1, Wo]
    offset = offset.reshape(n * deform_groups, k, 2, ho, wo)
    y = base_y + offset[:, :, 0]
    x_pos = base_x + offset[:, :, 1]
    grid = torch.stack((2 * x_pos / max(width - 1, 1) - 1, 2 * y / max(height - 1, 1) - 1), dim=-1)
    grouped = x.reshape(n * deform_groups, channels // deform_groups, height, width)
    sampled = F.grid_sample(grouped, grid.reshape(n * deform_groups, k * ho, wo, 2), mode="bilinear",
                            padding_mode="zeros", align_corners=True)  # [N*G, C/G, K*Ho, Wo]
    return sampled.reshape(n, channels * k, ho, wo)


class _QuantDeformConvForward(QuantModuleMixin):
    """The input quantizer sits on the sampled columns, right before the 1x1 conv: that is the tensor an
    INT8 engine convolves (bilinear samples of quantized values are not on the quantization grid)."""

    weight_in_axis = None  # the sampling sits between input and kernel: no input equalization

    def deform_forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        columns = sample_kernel_positions(self.prescale_input(x), offset, self.kernel_size, self.stride,
                                          self.padding, self.dilation, self.deform_groups)
        weight = self.quantized_weight()
        return F.conv2d(self.input_quantizer(columns), weight.reshape(weight.shape[0], -1, 1, 1),
                        groups=self.groups)  # mmcv's deformable convs have no bias


@register_quant_module(DeformConv2d)
class QuantDeformConv2d(_QuantDeformConvForward, DeformConv2d):
    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self.deform_forward(x, offset)


@register_quant_module(DeformConv2dPack)
class QuantDeformConv2dPack(_QuantDeformConvForward, DeformConv2dPack):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deform_forward(x, self.conv_offset(x))
