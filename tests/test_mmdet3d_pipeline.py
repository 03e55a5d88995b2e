"""A test pipeline wrapped in a one-augmentation MultiScaleFlipAug3D (mmdet3d's Waymo SECOND config) runs
as the plain pipeline it equals; test-time augmentation is refused with a clear message."""
import numpy as np
import pytest
import torch
from conftest import import_or_skip

pytestmark = pytest.mark.mmdet3d
import_or_skip("mmdet3d")
from mmdet3d.structures import LiDARInstance3DBoxes  # noqa: E402
from mmengine.dataset import Compose  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import lidar_ptq.mmdet3d  # noqa: E402,F401
from lidar_ptq.errors import ConfigError  # noqa: E402
from lidar_ptq.mmdet3d.calibration import single_pass_pipeline  # noqa: E402

RANGE = [-40.0, -40.0, -2.0, 40.0, 40.0, 4.0]


def wrapped(**aug):
    return [dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
            dict(type="MultiScaleFlipAug3D", img_scale=(1333, 800), pts_scale_ratio=1, flip=False, **aug,
                 transforms=[dict(type="GlobalRotScaleTrans", rot_range=[0, 0], scale_ratio_range=[1.0, 1.0],
                                  translation_std=[0, 0, 0]),
                             dict(type="RandomFlip3D"),
                             dict(type="PointsRangeFilter", point_cloud_range=RANGE),
                             dict(type="Pack3DDetInputs", keys=["points"])])]


def test_a_one_augmentation_wrapper_unrolls_into_the_same_frame(tmp_path):
    init_default_scope("mmdet3d")
    path = tmp_path / "frame.bin"
    points = (np.random.default_rng(0).random((2000, 5), dtype=np.float32) - 0.5) * np.float32([100, 100, 6, 1, 1])
    points.tofile(path)
    unrolled = single_pass_pipeline(wrapped())
    assert [s["type"] for s in unrolled] == ["LoadPointsFromFile", "GlobalRotScaleTrans", "RandomFlip3D",
                                             "PointsRangeFilter", "Pack3DDetInputs"]
    frame = dict(lidar_points=dict(lidar_path=str(path)), box_type_3d=LiDARInstance3DBoxes, box_mode_3d=None)
    through_wrapper = Compose(wrapped())(dict(frame))
    plain = Compose(unrolled)(dict(frame))
    assert isinstance(through_wrapper, list) and len(through_wrapper) == 1 and isinstance(plain, dict)
    assert torch.equal(through_wrapper[0]["inputs"]["points"], plain["inputs"]["points"])
    assert single_pass_pipeline(unrolled) == unrolled  # nothing to unroll


@pytest.mark.parametrize("aug", [dict(flip=True), dict(pts_scale_ratio=[0.95, 1.0, 1.05])])
def test_test_time_augmentation_is_refused_with_the_fix(aug):
    pipeline = wrapped()
    pipeline[1].update(aug)
    with pytest.raises(ConfigError, match="several augmentations .* set its flip=False and pts_scale_ratio=1"):
        single_pass_pipeline(pipeline)
