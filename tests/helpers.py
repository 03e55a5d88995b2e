"""Small models and data shared by tests."""
import torch
from torch import nn

from lidar_ptq.demo import sqnr_db  # noqa: F401  (re-exported for the tests)


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU stack with a transposed conv and a linear head (every twin type)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 2, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10),
    )
    # non-trivial BN statistics, as a trained model has
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def image_batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 16, 16, generator=g) for _ in range(n)]

