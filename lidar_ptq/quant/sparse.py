"""Fake-quant twins of spconv 2's sparse convolutions.

Weights are per output channel (spconv 2 stores [out, k..., in], so axis 0);
the input activation is per tensor over the active features only (a sparse
tensor's features *are* its non-empty voxels). The twins subclass spconv's own
classes, so ``SparseSequential`` hands them the ``SparseConvTensor`` and indice
keys / algorithms stay untouched. Importing this module needs spconv and
registers the twins with ``lidar_ptq.quantize`` and spconv's layers with
``fold_batchnorms``; it also installs the CPU compatibility layer.
"""
from __future__ import annotations

import spconv.pytorch as spconv

from .fold import FOLDABLE, SEQUENTIAL
from .modules import QuantModuleMixin, register_quant_module
from .spconv_compat import enable_spconv_cpu_compat

enable_spconv_cpu_compat()
# fold_batchnorms: BN1d after a sparse conv inside a SparseSequential (spconv 2 weights: out channels on axis 0)
if spconv.conv.SparseConvolution not in FOLDABLE:
    FOLDABLE.append(spconv.conv.SparseConvolution)
    SEQUENTIAL.append(spconv.SparseSequential)


class _QuantSparseConvForward(QuantModuleMixin):
    weight_axis = 0
    feature_axis = -1
    weight_in_axis = None  # libspconv has no per-channel input scaling: no equalization of sparse layers

    def forward(self, input: spconv.SparseConvTensor, add_input: spconv.SparseConvTensor | None = None):
        quantized = input.replace_feature(self.input_quantizer(input.features))
        return self._conv_forward(self.training, quantized, self.quantized_weight(), self.quantized_bias(), add_input,
                                  name=self.name, sparse_unique_name=self._sparse_unique_name,
                                  act_type=self.act_type, act_alpha=self.act_alpha, act_beta=self.act_beta)


@register_quant_module(spconv.SubMConv3d)
class QuantSubMConv3d(_QuantSparseConvForward, spconv.SubMConv3d):
    pass


@register_quant_module(spconv.SparseConv3d)
class QuantSparseConv3d(_QuantSparseConvForward, spconv.SparseConv3d):
    pass


@register_quant_module(spconv.SparseInverseConv3d)
class QuantSparseInverseConv3d(_QuantSparseConvForward, spconv.SparseInverseConv3d):
    pass
