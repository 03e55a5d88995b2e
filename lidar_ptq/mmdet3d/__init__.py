"""mmdetection3d integration: the only package that imports mmdet3d / mmengine / mmcv."""
