# mmdet3d's CenterPoint-Voxel (0.1 m voxels, spconv SparseEncoder, nuScenes) with LiDAR-PTQ W8A8 wired in.
# Usage as in centerpoint_pillar02_nus_lidar_ptq.py.
_base_ = ['mmdet3d::centerpoint/centerpoint_voxel01_second_secfpn_8xb4-cyclic-20e_nus-3d.py']

custom_hooks = [dict(type='lidar_ptq.mmdet3d.LidarPTQHook', recipe='configs/quant/ptq/lidar_ptq_w8a8.json', calib_frames=256)]
