"""Occupancy-based active sites for dense BEV layers (sparsity-based calibration)."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lidar_ptq
from lidar_ptq.lidar.occupancy import OccupancyMask, resize_mask


def test_resize_mask_pools_down_and_repeats_up():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 3, 0] = True
    down = resize_mask(mask, (2, 2))
    assert down[0, 0].tolist() == [[False, False], [True, False]]
    up = resize_mask(down, (4, 4))
    assert up[0, 0].sum() == 4 and up[0, 0, 2:, :2].all()


def bev_model():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(scatter=nn.Identity(), conv1=nn.Conv2d(4, 8, 3, padding=1), relu=nn.ReLU(),
                                      conv2=nn.Conv2d(8, 8, 3, stride=2, padding=1))).eval()
    with torch.no_grad():
        model.conv1.bias.fill_(3.0)  # empty cells become non-zero after conv1: "non-zero" != "occupied"
    return model


def sparse_bev(seed=0):
    g = torch.Generator().manual_seed(seed)
    occupied = torch.rand(2, 1, 16, 16, generator=g) < 0.05
    return torch.rand(2, 4, 16, 16, generator=g) * occupied, occupied


def test_occupancy_mask_restricts_dense_layer_ranges_to_occupied_cells():
    bev, occupied = sparse_bev()
    reference = bev_model()
    relu_out = reference.relu(reference.conv1(bev))
    expected = relu_out.permute(0, 2, 3, 1)[occupied[:, 0]].abs().max()

    model = lidar_ptq.quantize(bev_model(), {"input": {"observer": "sparse_minmax"}})
    with OccupancyMask(model, "scatter"):
        lidar_ptq.calibrate(model, [bev], progress=False)
    amax = model.conv2.input_quantizer.amax().item()
    assert amax == pytest.approx(expected.item() * 128 / 127, rel=1e-6)
    assert model.conv2.input_quantizer.site_mask_provider is None  # the context cleans up

    plain = lidar_ptq.quantize(bev_model(), {"input": {"observer": "sparse_minmax"}})
    lidar_ptq.calibrate(plain, [bev], progress=False)  # non-zero sites: every cell after conv1's bias
    assert plain.conv2.input_quantizer.amax().item() == pytest.approx(relu_out.abs().max().item() * 128 / 127,
                                                                      rel=1e-6)
    assert plain.conv2.input_quantizer.amax().item() > 1.05 * amax  # the empty cells did widen the range


def test_occupancy_source_must_exist():
    with pytest.raises(KeyError, match="pts_middle_encoder"):
        OccupancyMask(bev_model(), "middle")
