# `make demo`: the synthetic CenterPoint-Pillar on a small set of its own, generated on first use:
# 32 training frames (the CPU recipe's calibration frames) and 100 val frames to evaluate on.
# The benchmark's full set (2000 / 1000 frames) lives under data/synthetic_lidar/.
_base_ = ['./centerpoint_pillar_synthetic.py']

data_root = 'data/synthetic_demo/'
synthetic_data = dict(root=data_root, train=32, val=100, seed=0)
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
