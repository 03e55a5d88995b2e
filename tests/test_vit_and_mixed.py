"""Attention twin, log2 softmax quantizer, ViT reconstruction and mixed-precision allocation."""
import pytest
import torch
from torch import nn

import lidar_ptq
from lidar_ptq import FakeQuantizer, QuantSpec
from lidar_ptq.recon.engine import ReconConfig, reconstruct
from lidar_ptq.recon.mixed import allocate_bits, layer_sensitivity
from lidar_ptq.zoo.digits import DigitsViT


def test_log2_quantizer_values():
    q = FakeQuantizer(QuantSpec(bits=3, signed=False, scheme="log2"))
    q.set_range(torch.tensor(0.0), torch.tensor(1.0))
    x = torch.tensor([1.0, 0.5, 0.3, 0.1, 0.01, 0.0])
    # codes round(-log2 x): 0, 1, 2 (0.3 -> 1.74), 3 (0.1 -> 3.32), 7 (0.01 -> 6.64), past the last level -> 0
    torch.testing.assert_close(q(x), torch.tensor([1.0, 0.5, 0.25, 0.125, 2 ** -7, 0.0]))
    with pytest.raises(ValueError, match="scheme"):
        QuantSpec(scheme="log10")


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_twin_matches_float_and_quantizes_both_matmuls(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    ref, ref_w = mha(x, x, x)
    model = lidar_ptq.quantize(nn.ModuleList([mha]))
    twin = model[0]
    lidar_ptq.set_quant_mode(model, "float")
    out, weights = twin(x, x, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(weights, ref_w)
    lidar_ptq.calibrate(model, lambda m: m[0](x, x, x), progress=False)
    names = {n.split(".")[-1] for n, _ in lidar_ptq.iter_quantizers(model)}
    assert {"q_quantizer", "k_quantizer", "v_quantizer", "softmax_quantizer"} <= names
    assert not twin.softmax_quantizer.spec.signed  # probabilities use the unsigned grid
    out_q, _ = twin(x, x, x)
    assert 0 < (out_q - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_log2_softmax_option_quantizes_probabilities_to_powers_of_two():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = lidar_ptq.quantize(nn.ModuleList([nn.MultiheadAttention(16, 4, batch_first=True).eval()]),
                               {"softmax": {"scheme": "log2"}})
    lidar_ptq.calibrate(model, lambda m: m[0](x, x, x), progress=False)
    seen = {}
    model[0].softmax_quantizer.register_forward_hook(lambda m, i, o: seen.__setitem__("p", o))
    model[0](x, x, x)
    probs = seen["p"][seen["p"] > 0] / model[0].softmax_quantizer.amax()
    exponents = -torch.log2(probs)
    torch.testing.assert_close(exponents, exponents.round(), atol=1e-5, rtol=0)


def test_vit_block_reconstruction_runs_through_attention():
    torch.manual_seed(0)
    model = DigitsViT(dim=16, depth=1, heads=2).eval()
    data = [torch.rand(8, 1, 8, 8) for _ in range(2)]
    lidar_ptq.quantize(model, {"weight": {"bits": 4}, "input": {"bits": 4, "symmetric": False}})
    lidar_ptq.calibrate(model, data, progress=False)
    report = reconstruct(model, data, ReconConfig.from_method("qdrop", iterations=20, progress=False))
    assert [u.name for u in report.units] == ["patch", "blocks.0", "blocks.1", "head"]
    assert report.units[1].layers == 2  # attention twin + its out_proj


def test_mixed_precision_meets_the_budget_and_spares_the_sensitive_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[2].weight.mul_(10)  # a layer whose error dominates the output
    data = [torch.randn(32, 16) for _ in range(2)]
    lidar_ptq.quantize(model)
    lidar_ptq.calibrate(model, data, progress=False)
    sens = layer_sensitivity(model, data, bit_options=(2, 4, 8))
    assert all(s[2] > s[4] > s[8] for s in sens.values())
    allocation = allocate_bits(model, sens, average_bits=4.0)
    assert allocation.average_bits <= 4.0
    assert allocation.bits["2"] >= max(allocation.bits["0"], allocation.bits["4"])
    assert allocation.overrides()["0"] == {"weight": {"bits": allocation.bits["0"]}}
    with pytest.raises(ValueError, match="below"):
        allocate_bits(model, sens, average_bits=1.0)
