"""Train the digits ResNet / ViT used by the core benchmark (minutes on CPU, seeded).

Usage: python tools/train_digits.py --model resnet|vit [--task digits|hard] [--epochs N] [--out benchmarks/models]

``--task hard`` trains on distorted digits (``lidar_ptq.zoo.digits.distort``, a new draw every batch)
and tests on the distorted test set; the weights go to ``digits_hard_<model>.pth``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lidar_ptq.zoo.digits import MODELS, accuracy, distort, load_digits_split, load_hard_digits_split


def train(name: str, epochs: int, seed: int, lr: float, task: str = "digits") -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    data = load_hard_digits_split(seed) if task == "hard" else load_digits_split(seed)
    model = MODELS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(data["x_train"]) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"train {name}")
    for _ in bar:
        model.train()
        order = torch.randperm(len(data["x_train"]), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            x = data["x_train"][idx]
            if task == "hard":
                x = distort(x, gen)
            else:
                x = torch.roll(x, shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(x), data["y_train"][idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    info = {"model": name, "task": task, "epochs": epochs, "seed": seed, "lr": lr,
            "test_accuracy": accuracy(model, data["x_test"], data["y_test"]),
            "train_seconds": round(time.perf_counter() - start, 1)}
    return model.eval(), info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--task", choices=["digits", "hard"], default="digits")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/models"))
    args = parser.parse_args()
    epochs = args.epochs or {"resnet": 30, "vit": 120}[args.model]
    lr = args.lr or {"resnet": 3e-3, "vit": 2e-3}[args.model]
    model, info = train(args.model, epochs, args.seed, lr, args.task)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"digits_{args.model}" if args.task == "digits" else f"digits_hard_{args.model}"
    torch.save(model.state_dict(), args.out / f"{stem}.pth")
    (args.out / f"{stem}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
