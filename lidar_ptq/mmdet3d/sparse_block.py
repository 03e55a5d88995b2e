"""mmdet3d's ``SparseBasicBlock`` (SECOND/CenterPoint-Voxel SparseEncoder, basicblock type):
BN folding rule and a fake-quant twin whose residual add uses one shared scale.

An INT8 sparse engine (NVIDIA CUDA-CenterPoint's libspconv) adds the two branches
in one integer domain, so both addends must share one dynamic range: the twin
quantizes both with the same ``add_quantizer`` (calibrated on both).
"""
from __future__ import annotations

from typing import Any

from mmdet3d.models.layers.sparse_block import SparseBasicBlock, replace_feature
from torch import nn

from ..quant import sparse as _sparse  # noqa: F401  (spconv twins + CPU compat)
from ..quant.fold import FOLD_RULES, fold_bn
from ..quant.modules import clone_as, register_quant_module
from ..quant.quantizer import FakeQuantizer
from ..quant.spec import QuantSpec


def fold_sparse_basic_block(block: SparseBasicBlock) -> list[str]:
    """Fold norm1/norm2 into conv1/conv2 (spconv weights: out channels on axis 0); conv1 fuses the ReLU."""
    folded = []
    for conv_attr, norm_name in (("conv1", block.norm1_name), ("conv2", block.norm2_name)):
        norm = getattr(block, norm_name)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            fold_bn(getattr(block, conv_attr), norm, weight_axis=0)
            setattr(block, norm_name, nn.Identity())
            folded.append(norm_name)
    block.conv1.fused_activation = "relu"
    return folded


@register_quant_module(SparseBasicBlock)
class QuantSparseBasicBlock(SparseBasicBlock):
    """SparseBasicBlock whose residual add quantizes both addends with one shared quantizer."""

    @classmethod
    def from_float(cls, module: SparseBasicBlock, weight_spec: QuantSpec, input_spec: QuantSpec,
                   roles: dict[str, QuantSpec] | None = None) -> QuantSparseBasicBlock:
        twin = clone_as(cls, module)
        twin.add_quantizer = FakeQuantizer(input_spec, feature_axis=-1)
        return twin

    def forward(self, x: Any) -> Any:
        identity = x.features
        out = self.conv1(x)
        out = replace_feature(out, self.relu(self.norm1(out.features)))
        out = self.conv2(out)
        out = replace_feature(out, self.norm2(out.features))
        if self.downsample is not None:
            identity = self.downsample(x).features
        added = self.add_quantizer(out.features) + self.add_quantizer(identity)
        return replace_feature(out, self.relu(added))


FOLD_RULES[SparseBasicBlock] = fold_sparse_basic_block
