"""Distributed calibration-frame collection: each rank loads its share, every rank gets all frames.

Two CPU processes with the gloo backend (mmengine's own `--launcher pytorch` needs CUDA devices;
the collection code only uses torch.distributed through mmengine.dist, which this exercises).
"""
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import import_or_skip

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
from test_mmdet3d_ptq import PILLAR  # noqa: E402

from lidar_ptq.sim.dataset import DatasetSpec, generate  # noqa: E402


def _rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from mmdet3d.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import lidar_ptq.mmdet3d  # noqa: F401
    from lidar_ptq.mmdet3d.calibration import build_calibration_loader, collect_batches
    init_default_scope("mmdet3d")
    cfg = Config.fromfile(str(PILLAR))
    cfg.train_dataloader.dataset.data_root = root + "/"
    model = MODELS.build(cfg.model)
    loader = build_calibration_loader(cfg, 4, seed=1)
    local = [loader.dataset.indices[i] for i in range(len(loader.dataset))]
    batches = collect_batches(model, loader, progress=False)
    with open(f"{out}/rank{rank}.pkl", "wb") as f:
        pickle.dump({"local": local, "frames": [b.data_samples[0].metainfo["sample_idx"] for b in batches],
                     "voxels": [int(b.inputs["voxels"]["voxels"].shape[0]) for b in batches]}, f)
    dist.destroy_process_group()


def test_every_rank_gets_every_calibration_frame(tmp_path):
    generate(DatasetSpec(str(tmp_path / "data"), {"train": 6}, seed=2), workers=1, progress=False)
    port = 29500 + int(torch.randint(0, 400, (1,)))
    mp.spawn(_rank, args=(2, port, str(tmp_path / "data"), str(tmp_path)), nprocs=2, join=True)
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    assert len(results[0]["local"]) == 2 and len(results[1]["local"]) == 2       # each loaded half
    assert set(results[0]["local"]).isdisjoint(results[1]["local"])
    assert results[0]["frames"] == results[1]["frames"] and len(set(results[0]["frames"])) == 4
    assert results[0]["voxels"] == results[1]["voxels"]
