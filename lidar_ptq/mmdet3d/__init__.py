"""mmdetection3d integration: the only package that imports mmdet3d / mmengine / mmcv.

Importing it registers the synthetic dataset and metric, the PTQ hook and loop
(``custom_imports = dict(imports=['lidar_ptq.mmdet3d'])`` in a config; a hook
named by its import path, ``type='lidar_ptq.mmdet3d.LidarPTQHook'``, imports it
by itself), and
routes spconv's CPU kernels through the race-free compatibility path (also for
training: spconv's own CPU kernels give run-to-run different results on >1 thread).
"""
from . import datasets, deform_conv, hooks, layers, loops, metrics, sparse_block  # noqa: F401  (registries, layers, spconv CPU compat)
from .hooks import LidarPTQHook  # noqa: F401,E402  (importable by path from a config)
