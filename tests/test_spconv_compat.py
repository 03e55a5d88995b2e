"""spconv CPU compatibility: sparse convs with bias run forward/backward on CPU and match dense conv3d."""
import pytest
import torch
import torch.nn.functional as F
from conftest import import_or_skip

spconv = import_or_skip("spconv.pytorch")

from lidar_ptq.quant.spconv_compat import enable_spconv_cpu_compat  # noqa: E402

SHAPE = [8, 9, 10]


@pytest.fixture(scope="module", autouse=True)
def _compat():
    assert enable_spconv_cpu_compat()


def random_voxels(seed: int, num: int = 60, channels: int = 4):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(0, s, (num,), generator=g) for s in SHAPE], 1)
    coords = torch.unique(coords, dim=0)
    batch = torch.randint(0, 2, (len(coords), 1), generator=g)
    indices = torch.cat([batch, coords], 1).int()
    feats = torch.randn(len(indices), channels, generator=g)
    return feats, indices


def dense_weight(sp_weight: torch.Tensor) -> torch.Tensor:
    """spconv 2 stores [out, kD, kH, kW, in]; conv3d wants [out, in, kD, kH, kW]."""
    return sp_weight.permute(0, 4, 1, 2, 3).contiguous()


def gather(dense: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    b, z, y, x = indices.long().unbind(1)
    return dense[b, :, z, y, x]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["subm", "sparse"])
def test_sparse_conv_with_bias_matches_dense(kind, mode):
    torch.manual_seed(0)
    feats, indices = random_voxels(1)
    if kind == "subm":
        conv = spconv.SubMConv3d(4, 6, 3, bias=True, indice_key="k")
        stride, padding = 1, 1
    else:
        conv = spconv.SparseConv3d(4, 6, 3, stride=2, padding=1, bias=True, indice_key="k")
        stride, padding = 2, 1
    with torch.no_grad():
        conv.bias.normal_()
    getattr(conv, mode)()
    feats_sp = feats.clone().requires_grad_(True)
    out = conv(spconv.SparseConvTensor(feats_sp, indices, SHAPE, 2))
    probe = torch.randn_like(out.features)
    (out.features * probe).sum().backward()

    feats_d = feats.clone().requires_grad_(True)
    weight_d = dense_weight(conv.weight.detach()).requires_grad_(True)
    dense_in = spconv.SparseConvTensor(feats_d, indices, SHAPE, 2).dense()
    dense_out = F.conv3d(dense_in, weight_d, conv.bias.detach(), stride=stride, padding=padding)
    ref = gather(dense_out, out.indices)
    (ref * probe).sum().backward()

    assert out.features.shape == ref.shape
    torch.testing.assert_close(out.features, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats_sp.grad, feats_d.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_weight(conv.weight.grad), weight_d.grad, atol=1e-4, rtol=1e-5)
    if mode == "train":  # spconv adds the bias outside its kernel in train mode, so it gets a gradient
        torch.testing.assert_close(conv.bias.grad, probe.sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inverse_conv_with_bias_matches_dense_transpose(mode):
    torch.manual_seed(0)
    feats, indices = random_voxels(2)
    down = spconv.SparseConv3d(4, 5, 2, stride=2, bias=False, indice_key="d")
    inv = spconv.SparseInverseConv3d(5, 3, 2, bias=True, indice_key="d")
    with torch.no_grad():
        inv.bias.normal_()
    down.eval()
    getattr(inv, mode)()
    mid = down(spconv.SparseConvTensor(feats, indices, SHAPE, 2))
    mid_feats = mid.features.detach().clone().requires_grad_(True)
    out = inv(mid.replace_feature(mid_feats))
    probe = torch.randn_like(out.features)
    (out.features * probe).sum().backward()

    assert torch.equal(out.indices, indices)
    mid_d = mid_feats.detach().clone().requires_grad_(True)
    dense_mid = spconv.SparseConvTensor(mid_d, mid.indices, mid.spatial_shape, 2).dense()
    # inverse conv scatters each coarse voxel back through the kernel: a transposed conv with
    # weight [in, out, k...]
    w_t = inv.weight.detach().permute(4, 0, 1, 2, 3).contiguous().requires_grad_(True)
    dense_out = F.conv_transpose3d(dense_mid, w_t, stride=2)
    pad = [0, SHAPE[2] - dense_out.shape[4], 0, SHAPE[1] - dense_out.shape[3], 0, SHAPE[0] - dense_out.shape[2]]
    dense_out = F.pad(dense_out, pad)
    # fine voxels outside every coarse window (odd sizes) still get the bias
    ref = gather(dense_out, indices) + inv.bias.detach()
    (ref * probe).sum().backward()

    torch.testing.assert_close(out.features, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mid_feats.grad, mid_d.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inv.weight.grad.permute(4, 0, 1, 2, 3), w_t.grad, atol=1e-4, rtol=1e-5)


def test_compat_is_idempotent():
    from spconv.pytorch import ops
    first = ops.indice_conv, ops.indice_conv_backward
    assert enable_spconv_cpu_compat()
    assert (ops.indice_conv, ops.indice_conv_backward) == first  # no double wrapping


def test_cpu_stream_query_returns_null_stream():
    """spconv's CPU backward asked torch.cuda for a stream; without CUDA it now gets 0."""
    from spconv.pytorch import ops
    if torch.cuda.is_available():
        pytest.skip("only meaningful on CPU-only torch")
    assert ops.get_current_stream() == 0


def test_cpu_sparse_conv_is_deterministic_with_threads():
    """spconv's own CPU kernels gave different features run to run on 2 threads; ours must not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        feats, indices = random_voxels(1)
        torch.manual_seed(0)
        conv = spconv.SparseConv3d(4, 6, 3, stride=2, padding=1, indice_key="k")
        x = spconv.SparseConvTensor(feats, indices, SHAPE, 2)
        first = conv(x).features
        assert all(torch.equal(conv(x).features, first) for _ in range(50))
    finally:
        torch.set_num_threads(threads)
