"""LiDAR-PTQ (Zhou et al., ICLR 2024) on top of the generic core; independent of mmdet3d."""
