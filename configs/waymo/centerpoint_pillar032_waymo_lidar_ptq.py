# CenterPoint-Pillar on Waymo (3 classes), in the style of mmdet3d's nuScenes CenterPoint configs
# (mmdet3d 1.4 ships none for Waymo), on mmdet3d's Waymo dataset base, with LiDAR-PTQ W8A8 wired in.
# 0.32 m pillars over +-74.88 m (468x468 BEV), output stride 1, one 3-class CenterHead task.
# The head has no velocity branch: these configs are for PTQ and evaluation of trained checkpoints;
# mmdet3d 1.4's CenterHead.get_targets reads velocity targets unconditionally, so training one
# needs boxes padded with zero velocity (as configs/_base_/synthetic_lidar.py's dataset does).
# Evaluation: mmdet3d's WaymoMetric needs waymo-open-dataset in a separate environment (docs/waymo.md).
_base_ = ['mmdet3d::_base_/datasets/waymoD5-3d-3class.py', 'mmdet3d::_base_/default_runtime.py']

custom_hooks = [dict(type='lidar_ptq.mmdet3d.LidarPTQHook', recipe='configs/quant/ptq/lidar_ptq_w8a8.json', calib_frames=256)]

point_cloud_range = [-74.88, -74.88, -2, 74.88, 74.88, 4.0]
voxel_size = [0.32, 0.32, 6.0]
grid = [468, 468, 1]
class_names = ['Car', 'Pedestrian', 'Cyclist']
model = dict(
    type='CenterPoint',
    data_preprocessor=dict(
        type='Det3DDataPreprocessor', voxel=True,
        voxel_layer=dict(max_num_points=20, voxel_size=voxel_size, point_cloud_range=point_cloud_range,
                         max_voxels=(32000, 60000))),
    pts_voxel_encoder=dict(
        type='PillarFeatureNet', in_channels=5, feat_channels=[64], with_distance=False, voxel_size=voxel_size,
        point_cloud_range=point_cloud_range, norm_cfg=dict(type='BN1d', eps=1e-3, momentum=0.01), legacy=False),
    pts_middle_encoder=dict(type='PointPillarsScatter', in_channels=64, output_shape=grid[:2]),
    pts_backbone=dict(
        type='SECOND', in_channels=64, out_channels=[64, 128, 256], layer_nums=[3, 5, 5], layer_strides=[1, 2, 2],
        norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01), conv_cfg=dict(type='Conv2d', bias=False)),
    pts_neck=dict(
        type='SECONDFPN', in_channels=[64, 128, 256], out_channels=[128, 128, 128], upsample_strides=[1, 2, 4],
        norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01), upsample_cfg=dict(type='deconv', bias=False),
        use_conv_for_no_stride=True),
    pts_bbox_head=dict(
        type='CenterHead', in_channels=384,
        tasks=[dict(num_class=3, class_names=class_names)],
        common_heads=dict(reg=(2, 2), height=(1, 2), dim=(3, 2), rot=(2, 2)),
        share_conv_channel=64,
        bbox_coder=dict(type='CenterPointBBoxCoder', post_center_range=[-80, -80, -10.0, 80, 80, 10.0],
                        max_num=500, score_threshold=0.1, out_size_factor=1, voxel_size=voxel_size[:2],
                        pc_range=point_cloud_range[:2], code_size=7),
        separate_head=dict(type='SeparateHead', init_bias=-2.19, final_kernel=3),
        loss_cls=dict(type='mmdet.GaussianFocalLoss', reduction='mean'),
        loss_bbox=dict(type='mmdet.L1Loss', reduction='mean', loss_weight=0.25),
        norm_bbox=True),
    train_cfg=dict(pts=dict(
        grid_size=grid, voxel_size=voxel_size, out_size_factor=1, dense_reg=1, gaussian_overlap=0.1,
        max_objs=500, min_radius=2, point_cloud_range=point_cloud_range,
        code_weights=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])),
    test_cfg=dict(pts=dict(
        post_center_limit_range=[-80, -80, -10.0, 80, 80, 10.0], max_per_img=500, max_pool_nms=False,
        min_radius=[4], score_threshold=0.1, pc_range=point_cloud_range[:2], out_size_factor=1,
        voxel_size=voxel_size[:2], nms_type='rotate', pre_max_size=4096, post_max_size=500, nms_thr=0.7)))
