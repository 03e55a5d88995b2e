"""mmcv/mmdet3d layers CenterPoint is built from: fake-quant twins and BatchNorm folding rules.

mmcv's registered layer wrappers (``deconv`` is ``mmcv.cnn.bricks.wrappers.ConvTranspose2d``,
a torch subclass that only special-cases empty inputs) get the torch layers' twins.

mmcv's ``ConvModule`` (conv -> norm -> act as attributes, used by CenterHead)
and mmdet3d's ``PFNLayer``/``VFELayer`` (linear -> BN1d over a permuted tensor ->
ReLU in the pillar/voxel encoders) wire their BN outside a sequential container,
so ``fold_batchnorms`` needs to be told.
"""
from __future__ import annotations

from mmcv.cnn import ConvModule
from mmcv.cnn.bricks import wrappers
from mmdet3d.models.voxel_encoders.utils import PFNLayer, VFELayer
from torch import nn

from ..quant.fold import FOLD_RULES, fold_bn
from ..quant.modules import QUANT_MODULES, QuantConv2d, QuantConv3d, QuantConvTranspose2d, QuantLinear

for _wrapper, _twin in ((wrappers.Conv2d, QuantConv2d), (wrappers.Conv3d, QuantConv3d),
                        (wrappers.ConvTranspose2d, QuantConvTranspose2d), (wrappers.Linear, QuantLinear)):
    QUANT_MODULES.setdefault(_wrapper, _twin)


def fold_conv_module(module: ConvModule) -> list[str]:
    if not (module.with_norm and isinstance(module.norm, nn.modules.batchnorm._BatchNorm)):
        return []
    if module.order.index("norm") < module.order.index("conv"):
        return []  # a norm before the conv cannot be folded into it
    fold_bn(module.conv, module.norm)
    setattr(module, module.norm_name, nn.Identity())
    act_follows = module.order.index("act") > module.order.index("norm")
    if module.with_activation and act_follows and isinstance(module.activate, nn.ReLU):
        module.conv.fused_activation = "relu"
    return [module.norm_name]


def fold_point_layer(layer: PFNLayer | VFELayer) -> list[str]:
    if not isinstance(layer.norm, nn.modules.batchnorm._BatchNorm):
        return []
    fold_bn(layer.linear, layer.norm, weight_axis=0)
    layer.norm = nn.Identity()
    layer.linear.fused_activation = "relu"  # both apply F.relu right after the norm
    return ["norm"]


FOLD_RULES[ConvModule] = fold_conv_module
FOLD_RULES[PFNLayer] = fold_point_layer
FOLD_RULES[VFELayer] = fold_point_layer
