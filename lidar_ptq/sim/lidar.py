"""A spinning multi-beam LiDAR ray-cast into a ``Scene`` (numpy, vectorised over rays).

Every ray hits the nearest of: the ground plane and each oriented box (slab
test in the box frame), so occlusion falls out of the nearest hit. Returned
points carry nuScenes' five features (x, y, z, intensity, ring index).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import Scene


@dataclass(frozen=True)
class LidarConfig:
    beams: int = 32                      # nuScenes' HDL-32E
    elevation_deg: tuple[float, float] = (-30.67, 10.67)
    azimuth_steps: int = 1084            # per revolution, one sweep
    max_range: float = 70.0
    min_range: float = 1.0
    range_noise: float = 0.02            # metres, 1 sigma
    dropout: float = 0.08                # fraction of returns lost
    intensity_noise: float = 4.0
    chunk: int = 8192                    # rays per vectorised block (bounds memory)


def ray_directions(cfg: LidarConfig) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions [R, 3] and ring index [R] of one revolution."""
    elevation = np.deg2rad(np.linspace(cfg.elevation_deg[0], cfg.elevation_deg[1], cfg.beams))
    azimuth = np.linspace(-np.pi, np.pi, cfg.azimuth_steps, endpoint=False)
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)
    ring = np.broadcast_to(np.arange(cfg.beams)[:, None], el.shape)
    return dirs.reshape(-1, 3), ring.reshape(-1)


def _box_hits(dirs: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Entry distance [R, K] of rays from the origin into each box (inf for a miss)."""
    centre, half, yaw = boxes[:, :3], boxes[:, 3:6] / 2, boxes[:, 6]
    c, s = np.cos(yaw), np.sin(yaw)
    # ray origin and direction in each box frame (rotate by -yaw about z)
    ox, oy = -(c * centre[:, 0] + s * centre[:, 1]), -(-s * centre[:, 0] + c * centre[:, 1])
    origin = np.stack([ox, oy, -centre[:, 2]], axis=-1)                       # [K, 3]
    dx = dirs[:, None, 0] * c + dirs[:, None, 1] * s
    dy = -dirs[:, None, 0] * s + dirs[:, None, 1] * c
    d = np.stack([dx, dy, np.broadcast_to(dirs[:, None, 2], dx.shape)], axis=-1)  # [R, K, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (-half - origin) * inv
        t2 = (half - origin) * inv
    t_near = np.nanmax(np.minimum(t1, t2), axis=-1)
    t_far = np.nanmin(np.maximum(t1, t2), axis=-1)
    hit = (t_far >= t_near) & (t_near > 0)
    return np.where(hit, t_near, np.inf)


def cast(scene: Scene, rng: np.random.Generator, cfg: LidarConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Points [N, 5] float32 (x, y, z, intensity, ring) and the index of the box each hit (-1: ground)."""
    cfg = cfg or LidarConfig()
    dirs, ring = ray_directions(cfg)
    keep = rng.random(len(dirs)) >= cfg.dropout
    dirs, ring = dirs[keep], ring[keep]
    distance = np.full(len(dirs), np.inf)
    owner = np.full(len(dirs), -1, dtype=np.int64)
    with np.errstate(divide="ignore"):
        ground = np.where(dirs[:, 2] < 0, -scene.sensor_height / dirs[:, 2], np.inf)
    distance = np.minimum(distance, ground)
    if len(scene.boxes):
        for start in range(0, len(dirs), cfg.chunk):
            part = slice(start, start + cfg.chunk)
            t = _box_hits(dirs[part], scene.boxes)
            nearest = t.argmin(axis=1)
            t_min = t[np.arange(len(nearest)), nearest]
            closer = t_min < distance[part]
            distance[part] = np.where(closer, t_min, distance[part])
            owner[part] = np.where(closer, nearest, owner[part])
    distance = distance + rng.normal(0.0, cfg.range_noise, len(distance))
    valid = np.isfinite(distance) & (distance <= cfg.max_range) & (distance >= cfg.min_range)
    dirs, ring, distance, owner = dirs[valid], ring[valid], distance[valid], owner[valid]
    xyz = dirs * distance[:, None]
    reflect = np.where(owner >= 0, scene.reflectivity[np.maximum(owner, 0)], scene.ground_reflectivity)
    # returns weaken with range and grazing incidence (approximated by elevation for the ground)
    falloff = np.clip(1.0 - distance / (2.0 * cfg.max_range), 0.3, 1.0)
    intensity = np.clip(reflect * falloff + rng.normal(0.0, cfg.intensity_noise, len(distance)), 0.0, 255.0)
    points = np.concatenate([xyz, intensity[:, None], ring[:, None].astype(np.float64)], axis=1)
    return points.astype(np.float32), owner
