"""The anchor-head task loss: zero on identical outputs, driven by the float model's positives only."""
import torch

from lidar_ptq.lidar.anchor_loss import AnchorPositiveLoss, is_anchor_output
from lidar_ptq.lidar.tgpl import TGPLConfig


def anchor_output(seed: int, levels: int = 1):
    gen = torch.Generator().manual_seed(seed)
    def maps(channels):
        return [torch.randn(2, channels, 8, 8, generator=gen) for _ in range(levels)]
    return maps(6), maps(14), maps(4)  # 2 anchors x 3 classes, 2 anchors x 7 box values, 2 x 2 directions


def test_anchor_outputs_are_recognised_and_centerhead_outputs_are_not():
    assert is_anchor_output(anchor_output(0)) and is_anchor_output(anchor_output(0, levels=2))
    assert not is_anchor_output([[{"heatmap": torch.zeros(1, 1, 4, 4)}]])
    assert not is_anchor_output((torch.zeros(1, 1, 4, 4),))


def test_loss_is_zero_on_equal_outputs_and_ignores_changes_away_from_positives():
    loss = AnchorPositiveLoss(TGPLConfig(score_threshold=0.5, top_k=None, peak_kernel=1))
    ref = anchor_output(0)
    assert loss(ref, ref).item() == 0.0
    positives = loss.positives(ref[0][0]).any(dim=1)  # [B, H, W] locations the float model is confident at
    assert positives.any() and not positives.all()
    away = tuple([m.clone() for m in maps] for maps in ref)
    for maps in away:
        maps[0].permute(0, 2, 3, 1)[~positives] += 5.0  # changed where the float model sees nothing
    assert loss(away, ref).item() == 0.0
    at = tuple([m.clone() for m in maps] for maps in ref)
    at[1][0].permute(0, 2, 3, 1)[positives] += 1.0  # box regression moved at the positives: 14 channels by 1
    assert abs(loss(at, ref).item() - 1.0) < 1e-6


def test_loss_has_gradients_for_the_quantized_output():
    loss = AnchorPositiveLoss()
    ref = anchor_output(0)
    quant = tuple([m.clone().requires_grad_(True) for m in maps] for maps in anchor_output(1))
    loss(quant, ref).backward()
    assert quant[0][0].grad is not None and quant[0][0].grad.abs().sum() > 0
