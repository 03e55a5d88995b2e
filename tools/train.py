"""Train an mmdet3d model with mmdet3d's own training loop (Runner), e.g. the synthetic CenterPoints.

    python tools/train.py configs/synthetic/centerpoint_pillar_synthetic.py --work-dir work_dirs/pillar
    python tools/train.py ... --resume          # continue a killed run from its last checkpoint

Generates the synthetic data first when the config uses it and it is missing.
"""
from __future__ import annotations

import argparse
import logging

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from lidar_ptq.mmdet3d.synthetic import ensure_synthetic_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --work-dir")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir
    cfg.launcher = args.launcher
    cfg.resume = args.resume
    ensure_synthetic_data(cfg)
    Runner.from_cfg(cfg).train()


if __name__ == "__main__":
    main()
