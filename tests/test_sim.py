"""The synthetic LiDAR simulator: geometry, occlusion, determinism, dataset files."""
import pickle

import numpy as np
import pytest

from lidar_ptq.sim.dataset import DatasetSpec, generate, make_frame
from lidar_ptq.sim.lidar import LidarConfig, cast, ray_directions
from lidar_ptq.sim.scene import STRUCTURE, Scene, sample_scene


def one_box_scene(boxes, labels=None) -> Scene:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    labels = np.zeros(len(boxes), dtype=np.int64) if labels is None else np.asarray(labels)
    return Scene(boxes, labels, np.full(len(boxes), 50.0), 10.0, 1.84)


def test_ray_pattern_is_a_32_beam_revolution():
    dirs, ring = ray_directions(LidarConfig())
    assert dirs.shape == (32 * 1084, 3) and np.allclose(np.linalg.norm(dirs, axis=1), 1.0)
    elevation = np.degrees(np.arcsin(dirs[:, 2]))
    assert elevation.min() == pytest.approx(-30.67) and elevation.max() == pytest.approx(10.67)
    assert set(np.unique(ring)) == set(range(32))


def test_points_lie_on_the_ground_or_on_box_surfaces():
    rng = np.random.default_rng(0)
    car = [10.0, 0.0, -1.84 + 0.8, 4.5, 1.9, 1.6, 0.3]
    points, owner = cast(one_box_scene([car]), rng, LidarConfig(range_noise=0.0, dropout=0.0))
    ground = points[owner < 0]
    assert np.allclose(ground[:, 2], -1.84, atol=1e-4)
    on_car = points[owner == 0, :3] - np.array(car[:3])
    c, s = np.cos(-car[6]), np.sin(-car[6])
    local = np.stack([c * on_car[:, 0] - s * on_car[:, 1], s * on_car[:, 0] + c * on_car[:, 1], on_car[:, 2]], 1)
    half = np.array(car[3:6]) / 2
    assert len(local) > 100
    assert np.all(np.abs(local) <= half + 1e-4)                        # inside the box
    assert np.all(np.min(half - np.abs(local), axis=1) < 1e-4)          # on its surface
    assert points.shape[1] == 5 and points.dtype == np.float32


def test_nearest_hit_occludes_objects_behind_a_wall():
    rng = np.random.default_rng(0)
    wall = [6.0, 0.0, 1.0, 0.5, 12.0, 6.0, 0.0]
    pedestrian = [15.0, 0.0, -1.84 + 0.9, 0.6, 0.6, 1.8, 0.0]
    _, owner = cast(one_box_scene([wall, pedestrian], [STRUCTURE, 1]), rng, LidarConfig())
    assert (owner == 0).sum() > 0 and (owner == 1).sum() == 0
    _, owner = cast(one_box_scene([pedestrian], [1]), rng, LidarConfig())
    assert (owner == 0).sum() > 0  # visible without the wall


def test_frames_are_reproducible_and_annotations_have_points():
    points_a, inst_a = make_frame(7, "train", 3)
    points_b, inst_b = make_frame(7, "train", 3)
    np.testing.assert_array_equal(points_a, points_b)
    assert inst_a == inst_b and len(inst_a) > 5
    assert all(i["num_lidar_pts"] >= 1 for i in inst_a)
    assert {i["bbox_label_3d"] for i in inst_a} <= {0, 1, 2}
    assert not np.array_equal(make_frame(7, "train", 4)[0][:100], points_a[:100])


def test_scene_has_all_classes_and_structure():
    scene = sample_scene(np.random.default_rng(1))
    labels = set(scene.labels.tolist())
    assert {0, 1, 2, STRUCTURE} <= labels
    assert np.all(np.abs(scene.boxes[scene.annotated, :2]) <= 38.0)


def test_generate_writes_mmdet3d_infos_and_resumes(tmp_path):
    spec = DatasetSpec(str(tmp_path), {"train": 3, "val": 2}, seed=1)
    paths = generate(spec, workers=1, progress=False)
    info = pickle.loads(paths["train"].read_bytes())
    assert info["metainfo"]["categories"] == {"car": 0, "pedestrian": 1, "bicycle": 2}
    frame = info["data_list"][0]
    points = np.fromfile(tmp_path / "points" / frame["lidar_points"]["lidar_path"], dtype=np.float32)
    assert points.size % 5 == 0 and points.size // 5 > 10000
    assert len(frame["instances"][0]["bbox_3d"]) == 7
    stamp = paths["val"].stat().st_mtime_ns
    generate(spec, workers=1, progress=False)  # both info files exist: nothing is regenerated
    assert paths["val"].stat().st_mtime_ns == stamp
    shorter = pickle.loads(paths["val"].read_bytes())["data_list"]
    longer = generate(DatasetSpec(str(tmp_path), {"train": 3, "val": 3}, seed=1), workers=1, progress=False)
    grown = pickle.loads(longer["val"].read_bytes())["data_list"]
    assert len(grown) == 3 and grown[:2] == shorter  # a longer split starts with the shorter one's frames


def test_configs_generate_missing_splits_only_and_benchmarks_can_ask_for_more(tmp_path):
    """A config's synthetic_data sizes generate a missing split; a present, shorter split (a test's small
    set) is left alone unless a caller asks for at least more frames of it."""
    pytest.importorskip("mmdet3d")
    from lidar_ptq.mmdet3d.synthetic import ensure_synthetic_data
    from lidar_ptq.sim.dataset import frames_in

    spec = DatasetSpec(str(tmp_path), {"train": 2, "val": 2}, seed=1)
    generate(spec, workers=1, progress=False)
    cfg = {"synthetic_data": {"root": str(tmp_path), "train": 2000, "val": 300, "seed": 1},
           "test_dataloader": {"dataset": {"data_root": str(tmp_path)}}}
    assert ensure_synthetic_data(cfg)
    assert frames_in(spec.info_path("train")) == 2 and frames_in(spec.info_path("val")) == 2
    ensure_synthetic_data(cfg, workers=1, at_least={"val": 3})
    assert frames_in(spec.info_path("train")) == 2 and frames_in(spec.info_path("val")) == 3
