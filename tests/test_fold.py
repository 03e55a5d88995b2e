"""BatchNorm folding keeps eval outputs and turns conv+BN into conv-with-bias."""
import pytest
import torch
from helpers import image_batches, small_cnn
from torch import nn

from lidar_ptq import fold_batchnorms, fold_bn


def randomise_bn(bn):
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.3, 3)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("layer,bn,x", [
    (nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), torch.randn(2, 3, 7, 7)),
    (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), torch.randn(2, 3, 9)),
    (nn.ConvTranspose2d(3, 5, 2, stride=2), nn.BatchNorm2d(5), torch.randn(2, 3, 4, 4)),
    (nn.Linear(3, 5, bias=False), nn.BatchNorm1d(5), torch.randn(6, 3)),
])
@torch.no_grad()
def test_fold_bn_matches_eval_output(layer, bn, x):
    randomise_bn(bn)
    ref = bn(layer(x))
    fold_bn(layer, bn)
    assert layer.bias is not None
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fold_batchnorms_in_sequential():
    model = small_cnn()
    x = image_batches(1)[0]
    ref = model(x)
    folded = fold_batchnorms(model)
    assert folded == ["1", "4", "7"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)


def test_fold_errors_are_clear():
    with pytest.raises(ValueError, match="channels"):
        fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
