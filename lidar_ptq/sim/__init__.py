"""Synthetic LiDAR scenes, sensor model and mmdet3d-style dataset: the project's seeded benchmark data."""
