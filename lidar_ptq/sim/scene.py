"""Random street scenes for the synthetic LiDAR benchmark.

A scene is a list of oriented boxes on a flat ground plane: annotated objects
(car, pedestrian, bicycle) and unannotated structure (buildings, walls, poles,
clutter) that occludes them. The layout follows a street: a road through the
sensor at a random heading, vehicles in lanes and parked at the kerb, people and
bicycles mostly on the sidewalks, buildings behind the sidewalks with gaps, so
that far and partly hidden objects are common, as in real scans.
Box convention (mmdet3d LiDAR): x, y, z of the box centre, length along the
heading, width, height, yaw counter-clockwise from +x.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CLASSES: tuple[str, ...] = ("car", "pedestrian", "bicycle")
STRUCTURE = -1  # label of unannotated boxes


@dataclass(frozen=True)
class ObjectPrior:
    """Size ranges (length, width, height in metres) and count range of one kind of box."""
    size_low: tuple[float, float, float]
    size_high: tuple[float, float, float]
    count: tuple[int, int]
    reflectivity: tuple[float, float]  # intensity range, nuScenes-like 0..255 scale


@dataclass(frozen=True)
class SceneConfig:
    sensor_height: float = 1.84                 # nuScenes LIDAR_TOP above ground
    extent: float = 38.0                        # objects are placed with |x|,|y| <= extent
    road_half_width: tuple[float, float] = (4.0, 8.0)
    sidewalk_width: float = 4.0
    objects: dict[str, ObjectPrior] = field(default_factory=lambda: {
        "car": ObjectPrior((3.8, 1.6, 1.4), (5.2, 2.1, 2.0), (6, 22), (20.0, 90.0)),
        "pedestrian": ObjectPrior((0.4, 0.4, 1.5), (0.9, 0.9, 1.95), (3, 14), (10.0, 50.0)),
        "bicycle": ObjectPrior((1.5, 0.5, 1.0), (1.9, 0.8, 1.8), (1, 6), (15.0, 70.0)),
    })
    buildings: tuple[int, int] = (4, 12)
    poles: tuple[int, int] = (4, 14)
    clutter: tuple[int, int] = (5, 20)


@dataclass
class Scene:
    boxes: np.ndarray          # [K, 7] float64 (x, y, z_centre, l, w, h, yaw)
    labels: np.ndarray         # [K] int: class index or STRUCTURE
    reflectivity: np.ndarray   # [K] intensity of each box's surface
    ground_reflectivity: float
    sensor_height: float

    @property
    def annotated(self) -> np.ndarray:
        return self.labels >= 0


class _Placer:
    """Rejection sampling of non-overlapping boxes (bounding circles in bird's-eye view)."""

    def __init__(self) -> None:
        self.centres: list[tuple[float, float]] = [(0.0, 0.0)]
        self.radii: list[float] = [2.5]  # keep the ego vehicle's footprint free

    def fits(self, x: float, y: float, radius: float) -> bool:
        centres, radii = np.asarray(self.centres), np.asarray(self.radii)
        return bool(np.all(np.hypot(centres[:, 0] - x, centres[:, 1] - y) > radii + radius + 0.2))

    def add(self, x: float, y: float, radius: float) -> None:
        self.centres.append((x, y))
        self.radii.append(radius)


def _street_to_world(along: float, across: float, heading: float) -> tuple[float, float]:
    c, s = np.cos(heading), np.sin(heading)
    return along * c - across * s, along * s + across * c


def sample_scene(rng: np.random.Generator, cfg: SceneConfig | None = None) -> Scene:
    """One random street scene."""
    cfg = cfg or SceneConfig()
    heading = rng.uniform(-np.pi, np.pi)
    road = rng.uniform(*cfg.road_half_width)
    placer = _Placer()
    boxes, labels, refl = [], [], []
    ground_z = -cfg.sensor_height

    def place(size: np.ndarray, label: int, reflectivity: float, across_range: tuple[float, float],
              yaw_offset: float, both_sides: bool = True, tries: int = 30) -> None:
        radius = 0.5 * float(np.hypot(size[0], size[1]))
        for _ in range(tries):
            along = rng.uniform(-cfg.extent * 1.4, cfg.extent * 1.4)
            across = rng.uniform(*across_range) * (rng.choice([-1.0, 1.0]) if both_sides else 1.0)
            x, y = _street_to_world(along, across, heading)
            if max(abs(x), abs(y)) > cfg.extent - radius or not placer.fits(x, y, radius):
                continue
            placer.add(x, y, radius)
            yaw = (heading + yaw_offset + np.pi) % (2 * np.pi) - np.pi
            boxes.append([x, y, ground_z + size[2] / 2, size[0], size[1], size[2], yaw])
            labels.append(label)
            refl.append(reflectivity)
            return

    def draw_size(prior: ObjectPrior) -> np.ndarray:
        return rng.uniform(prior.size_low, prior.size_high)

    sidewalk = (road, road + cfg.sidewalk_width)
    for label, name in enumerate(CLASSES):
        prior = cfg.objects[name]
        for _ in range(rng.integers(prior.count[0], prior.count[1] + 1)):
            size = draw_size(prior)
            reflectivity = rng.uniform(*prior.reflectivity)
            if name == "car":
                if rng.random() < 0.15:       # parking lot / driveway: anywhere off the road
                    place(size, label, reflectivity, (road + 1.0, cfg.extent), rng.uniform(-np.pi, np.pi))
                else:                         # lanes and kerb, either direction of travel
                    yaw = rng.choice([0.0, np.pi]) + rng.normal(0.0, 0.08)
                    place(size, label, reflectivity, (0.5, road - size[1] / 2), yaw)
            elif name == "pedestrian":
                on_road = rng.random() < 0.2
                place(size, label, reflectivity, (0.0, road) if on_road else sidewalk, rng.uniform(-np.pi, np.pi))
            else:
                on_sidewalk = rng.random() < 0.5
                yaw = rng.choice([0.0, np.pi]) + rng.normal(0.0, 0.3)
                place(size, label, reflectivity, sidewalk if on_sidewalk else (road - 1.5, road), yaw)

    outer = (road + cfg.sidewalk_width, road + cfg.sidewalk_width + 6.0)
    for _ in range(rng.integers(*cfg.buildings)):
        size = np.array([rng.uniform(6, 30), rng.uniform(4, 12), rng.uniform(3, 15)])
        place(size, STRUCTURE, rng.uniform(5, 40), (outer[0] + size[1] / 2, outer[1] + size[1] / 2), 0.0)
    for _ in range(rng.integers(*cfg.poles)):
        d = rng.uniform(0.15, 0.35)
        place(np.array([d, d, rng.uniform(3, 8)]), STRUCTURE, rng.uniform(30, 120),
              (sidewalk[1] - 0.5, sidewalk[1]), 0.0)
    for _ in range(rng.integers(*cfg.clutter)):   # bushes, bins, boxes, barriers
        size = np.array([rng.uniform(0.4, 3.0), rng.uniform(0.4, 1.5), rng.uniform(0.3, 1.3)])
        place(size, STRUCTURE, rng.uniform(5, 60), (road, cfg.extent), rng.uniform(-np.pi, np.pi))

    boxes_arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    return Scene(boxes_arr, np.asarray(labels, dtype=np.int64), np.asarray(refl, dtype=np.float64),
                 float(rng.uniform(3, 15)), cfg.sensor_height)
