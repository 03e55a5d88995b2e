"""A ResNet-style CNN and a small ViT for scikit-learn's bundled 8x8 digits, and a harder variant of the
task (turned, scaled, shifted, noisy digits) whose test set is large enough to rank quantizers.

The digits set ships inside scikit-learn, so the core benchmark needs no
download. Both models use only standard torch layers, so the generic
quantization path (not a model-specific one) is what gets measured.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def load_digits_split(seed: int = 0, test_fraction: float = 1 / 3) -> dict[str, torch.Tensor]:
    """Digits as [N, 1, 8, 8] float tensors in [0, 1] with a fixed, seeded train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return {"x_train": images[train], "y_train": labels[train], "x_test": images[test], "y_test": labels[test]}


def distort(images: torch.Tensor, generator: torch.Generator, max_rotation: float = 20.0,
            scale: tuple[float, float] = (0.85, 1.15), max_shift: float = 1.0, noise: float = 0.1) -> torch.Tensor:
    """Each image turned (degrees), scaled and shifted (pixels) at random, plus Gaussian pixel noise: the
    hard digits task, where a quantized model's errors are many enough to be counted."""
    n, size = len(images), images.shape[-1]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotation)
    factor = scale[0] + torch.rand(n, generator=generator) * (scale[1] - scale[0])
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * max_shift / size)  # in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, align_corners=False)
    return (out + noise * torch.randn(out.shape, generator=generator)).clamp(0.0, 1.0)


def load_hard_digits_split(seed: int = 0, test_copies: int = 10) -> dict[str, torch.Tensor]:
    """The digits split with a distorted test set: every test image ``test_copies`` times, each copy
    distorted by its own seeded draw (about 6000 test images). The training images stay clean; training
    and calibration distort them on the fly."""
    data = load_digits_split(seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    data["x_test"] = distort(data["x_test"].repeat(test_copies, 1, 1, 1), generator)
    data["y_test"] = data["y_test"].repeat(test_copies)
    return data


class BasicBlock(nn.Module):
    """ResNet basic block; conv/BN pairs sit in Sequentials so ``fold_batchnorms`` finds them."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 2 * width), BasicBlock(2 * width, 4 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Pre-norm self-attention sub-block (its residual add closes the block)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class DigitsViT(nn.Module):
    """ViT on 2x2 patches (16 tokens + class token)."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[m for _ in range(depth)
                                      for m in (SelfAttention(dim, heads), FeedForward(dim, 2 * dim))])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


MODELS = {"resnet": DigitsResNet, "vit": DigitsViT}


@torch.no_grad()
def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Per image: whether the model's top-1 class is the label (the items of a bootstrap interval)."""
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) == y[i:i + batch] for i in range(0, len(x), batch)]).numpy()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float(correct(model, x, y, batch).mean())
