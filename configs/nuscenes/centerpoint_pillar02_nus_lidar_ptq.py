# mmdet3d's CenterPoint-Pillar (0.2 m pillars, nuScenes) with LiDAR-PTQ W8A8 wired in.
#   test the INT8 model with mmdet3d's own test flow (hook quantizes at before_test):
#     python -c "from mmengine.config import Config; from mmengine.runner import Runner; \
#       cfg = Config.fromfile('configs/nuscenes/centerpoint_pillar02_nus_lidar_ptq.py'); \
#       cfg.load_from = 'ckpt.pth'; cfg.work_dir = 'work_dirs/x'; Runner.from_cfg(cfg).test()"
#   or float vs INT8 side by side:
#     python tools/quantize.py configs/nuscenes/centerpoint_pillar02_nus_lidar_ptq.py ckpt.pth
# Data: mmdet3d's nuScenes preparation (python mmdet3d/.mim/tools/create_data.py nuscenes ...).
_base_ = ['mmdet3d::centerpoint/centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py']

custom_hooks = [dict(type='lidar_ptq.mmdet3d.LidarPTQHook', recipe='configs/quant/ptq/lidar_ptq_w8a8.json', calib_frames=256)]
