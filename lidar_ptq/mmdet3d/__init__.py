"""mmdetection3d integration: the only package that imports mmdet3d / mmengine / mmcv.

Importing it registers the synthetic dataset and metric, the PTQ hook and loop
(``custom_imports = dict(imports=['lidar_ptq.mmdet3d'])`` in a config), and
routes spconv's CPU kernels through the race-free compatibility path (also for
training: spconv's own CPU kernels give run-to-run different results on >1 thread).
"""
from . import datasets, deform_conv, hooks, layers, loops, metrics, sparse_block  # noqa: F401  (registries, layers, spconv CPU compat)
