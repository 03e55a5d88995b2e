"""mmdet3d SparseBasicBlock: BN folding rule and the shared-scale residual add twin."""
import copy

import pytest
import torch
from conftest import import_or_skip

import lidar_ptq

import_or_skip("mmdet3d")
spconv = import_or_skip("spconv.pytorch")
sparse_block = import_or_skip("mmdet3d.models.layers.sparse_block")

SHAPE = [8, 10, 10]


@pytest.fixture(scope="module", autouse=True)
def _deterministic_cpu_spconv():
    """The float reference must run through the compat layer too: spconv's own CPU kernels race on
    more than one thread (this test failed about 1 run in 10 before it enabled the layer first)."""
    from lidar_ptq.quant.spconv_compat import enable_spconv_cpu_compat

    assert enable_spconv_cpu_compat()


def voxels(seed=0, channels=8):
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.stack([torch.randint(0, s, (120,), generator=g) for s in SHAPE], 1), dim=0)
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    return spconv.SparseConvTensor(torch.randn(len(indices), channels, generator=g), indices, SHAPE, 1)


def block():
    torch.manual_seed(0)
    b = sparse_block.SparseBasicBlock(8, 8, indice_key="s1").eval()
    for norm in (b.norm1, b.norm2):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    return b


def test_fold_rule_keeps_outputs_and_marks_fused_relu():
    b, x = block(), voxels()
    with torch.no_grad():
        ref = b(x).features
        assert lidar_ptq.fold_batchnorms(b) == ["bn1", "bn2"]
        torch.testing.assert_close(b(x).features, ref, atol=1e-5, rtol=1e-5)
    assert b.conv1.fused_activation == "relu"


def test_residual_add_shares_one_scale_and_matches_manual_fake_quant():
    float_block, x = block(), voxels()
    lidar_ptq.fold_batchnorms(float_block)
    model = lidar_ptq.quantize(spconv.SparseSequential(copy.deepcopy(float_block)), "w8a8")
    from lidar_ptq.mmdet3d.sparse_block import QuantSparseBasicBlock
    from lidar_ptq.quant.sparse import QuantSubMConv3d

    twin = model[0]
    assert isinstance(twin, QuantSparseBasicBlock)  # children were swapped before the block was cloned
    assert isinstance(twin.conv1, QuantSubMConv3d) and isinstance(twin.conv2, QuantSubMConv3d)
    assert lidar_ptq.calibrate(model, [x], progress=False) == []
    assert [n for n, _ in lidar_ptq.iter_quantizers(model)][-1] == "0.add_quantizer"
    with torch.no_grad():
        out = model(x).features
        q1 = twin.conv1(x)
        q2 = twin.conv2(q1.replace_feature(torch.relu(q1.features)))
        add = twin.add_quantizer
        manual = torch.relu(add(q2.features) + add(x.features))  # the same quantizer on both addends
        lidar_ptq.set_quant_mode(model, "float")
        f1 = twin.conv1(x)
        branch = twin.conv2(f1.replace_feature(torch.relu(f1.features))).features
    torch.testing.assert_close(out, manual)
    # its one range was calibrated on both addends
    expected = max(branch.abs().max().item(), x.features.abs().max().item()) * 128 / 127
    assert add.amax().item() == torch.tensor(expected).item()


def test_sparse_block_is_one_reconstruction_unit():
    from lidar_ptq.recon.engine import ReconConfig, reconstruct

    model = lidar_ptq.quantize(spconv.SparseSequential(block()), {"weight": {"bits": 4}})
    data = [voxels(seed=s) for s in range(2)]
    lidar_ptq.calibrate(model, data, progress=False)
    report = reconstruct(model, data, ReconConfig.from_method("brecq", iterations=30, progress=False))
    assert [(u.name, u.layers) for u in report.units] == [("0", 2)]
    assert model[0].add_quantizer.calibrated and not model[0].add_quantizer.learns_scale
