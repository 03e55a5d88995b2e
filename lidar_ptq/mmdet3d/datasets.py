"""The synthetic LiDAR benchmark as an mmdet3d dataset (stock loading pipelines run on it)."""
from __future__ import annotations

import numpy as np
from mmdet3d.datasets import Det3DDataset
from mmdet3d.registry import DATASETS
from mmdet3d.structures import LiDARInstance3DBoxes

from ..sim.scene import CLASSES


@DATASETS.register_module()
class SyntheticLidarDataset(Det3DDataset):
    """Info files written by ``lidar_ptq.sim.dataset``; boxes stored as gravity centres like nuScenes.

    Boxes gain a zero velocity (9 values, as nuScenes'): mmdet3d 1.4's ``CenterHead``
    builds velocity targets unconditionally, and a static scene has none.
    """

    METAINFO = {"classes": CLASSES, "palette": [(255, 158, 0), (0, 0, 230), (220, 20, 60)]}

    def __init__(self, data_root: str, ann_file: str, pipeline: list | None = None,
                 data_prefix: dict | None = None, box_type_3d: str = "LiDAR", **kwargs) -> None:
        super().__init__(data_root=data_root, ann_file=ann_file, pipeline=pipeline or [],
                         data_prefix=data_prefix or {"pts": "points"}, box_type_3d=box_type_3d,
                         modality={"use_lidar": True, "use_camera": False}, **kwargs)

    def parse_ann_info(self, info: dict) -> dict:
        ann_info = super().parse_ann_info(info)
        if ann_info is None:
            ann_info = {"gt_bboxes_3d": np.zeros((0, 7), dtype=np.float32),
                        "gt_labels_3d": np.zeros(0, dtype=np.int64)}
        boxes = np.asarray(ann_info["gt_bboxes_3d"], dtype=np.float32).reshape(-1, 7)
        boxes = np.concatenate([boxes, np.zeros((len(boxes), 2), dtype=np.float32)], axis=1)
        ann_info["gt_bboxes_3d"] = LiDARInstance3DBoxes(boxes, box_dim=9,
                                                        origin=(0.5, 0.5, 0.5)).convert_to(self.box_mode_3d)
        return ann_info
