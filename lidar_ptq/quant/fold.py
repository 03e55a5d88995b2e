"""BatchNorm folding: what a deployment engine runs is conv-with-bias, so quantize that."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .integrations import load_integrations

# Layers a BN can fold into, and containers that run their children in order; extended by
# lidar_ptq.quant.sparse with spconv's sparse convolutions and SparseSequential.
FOLDABLE: list[type] = [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                        nn.Linear]
SEQUENTIAL: list[type] = [nn.Sequential]
FUSABLE_ACTIVATIONS = {nn.ReLU: "relu"}
# Blocks whose conv/BN pairs are attributes, not a sequence: type -> fn(block) -> names of folded BNs
FOLD_RULES: dict[type, Callable[[nn.Module], list[str]]] = {}


def output_channel_axis(module: nn.Module) -> int:
    """Axis of ``module.weight`` that indexes output channels."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


@torch.no_grad()
def fold_bn(module: nn.Module, bn: nn.modules.batchnorm._BatchNorm, weight_axis: int | None = None) -> nn.Module:
    """Fold ``bn`` (running statistics) into ``module``'s weight and bias, in place.

    ``weight_axis`` defaults to the output-channel axis of known layers; pass it
    for other layers (e.g. 0 for spconv's [out, k..., in] weights).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    axis = output_channel_axis(module) if weight_axis is None else weight_axis
    weight = module.weight
    if getattr(module, "groups", 1) != 1 and axis == 1:
        raise ValueError("folding BN into a grouped transposed convolution is not supported")
    if weight.shape[axis] != bn.num_features:
        raise ValueError(f"BatchNorm has {bn.num_features} channels but the layer has {weight.shape[axis]} outputs")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    shape = [1] * weight.dim()
    shape[axis] = -1
    weight.mul_(factor.reshape(shape).to(weight.dtype))
    bias = module.bias if module.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    if module.bias is None:
        module.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        module.bias.copy_(new_bias)
    return module


def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a foldable layer inside a sequential container.

    The BN is replaced by ``nn.Identity``; when an activation follows it, the layer
    is marked with ``fused_activation`` (e.g. ``"relu"``) for exporters, as an
    engine runs conv+bias+ReLU as one kernel (the activation module stays and
    still runs). Returns the names of the folded BNs. Layers wired outside
    sequential containers are folded with ``fold_bn`` by the adapter that knows
    the wiring.
    """
    load_integrations(model)
    folded: list[str] = []
    for seq_name, seq in model.named_modules():
        rule = FOLD_RULES.get(type(seq))
        if rule is not None:
            folded += [f"{seq_name}.{name}" if seq_name else name for name in rule(seq)]
        if not isinstance(seq, tuple(SEQUENTIAL)):
            continue
        names = list(seq._modules)
        for i, (prev, cur) in enumerate(zip(names, names[1:])):
            layer, bn = seq._modules[prev], seq._modules[cur]
            if isinstance(layer, tuple(FOLDABLE)) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                fold_bn(layer, bn)
                seq._modules[cur] = nn.Identity()
                folded.append(f"{seq_name}.{cur}" if seq_name else cur)
                following = seq._modules[names[i + 2]] if i + 2 < len(names) else None
                activation = FUSABLE_ACTIVATIONS.get(type(following))
                if activation:
                    layer.fused_activation = activation
    return folded
