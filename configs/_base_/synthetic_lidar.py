# The project's synthetic LiDAR benchmark (lidar_ptq.sim): a 32-beam nuScenes-like
# sensor ray-cast into random street scenes; 3 classes. Generate it with
#   python -m lidar_ptq.sim.dataset --root data/synthetic_lidar
# (tools/quantize.py and tools/train.py do this on first use).
custom_imports = dict(imports=['lidar_ptq.mmdet3d'], allow_failed_imports=False)

point_cloud_range = [-38.4, -38.4, -3.0, 38.4, 38.4, 3.0]
class_names = ['car', 'pedestrian', 'bicycle']
metainfo = dict(classes=class_names)
dataset_type = 'SyntheticLidarDataset'
data_root = 'data/synthetic_lidar/'
backend_args = None
# Generation settings read by the tools when the data is missing.
synthetic_data = dict(root=data_root, train=2000, val=300, seed=0)

train_pipeline = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=4, backend_args=backend_args),
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True),
    dict(type='GlobalRotScaleTrans', rot_range=[-0.3925, 0.3925], scale_ratio_range=[0.95, 1.05],
         translation_std=[0, 0, 0]),
    dict(type='RandomFlip3D', sync_2d=False, flip_ratio_bev_horizontal=0.5, flip_ratio_bev_vertical=0.5),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes=class_names),
    dict(type='PointShuffle'),
    dict(type='Pack3DDetInputs', keys=['points', 'gt_bboxes_3d', 'gt_labels_3d']),
]
test_pipeline = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=4, backend_args=backend_args),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='Pack3DDetInputs', keys=['points']),
]

train_dataloader = dict(
    batch_size=4, num_workers=1, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='synthetic_infos_train.pkl',
                 pipeline=train_pipeline, metainfo=metainfo, test_mode=False, filter_empty_gt=False,
                 backend_args=backend_args))
val_dataloader = dict(
    batch_size=1, num_workers=1, persistent_workers=True, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='synthetic_infos_val.pkl',
                 pipeline=test_pipeline, metainfo=metainfo, test_mode=True, backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(type='CenterDistanceMAP', classes=class_names, eval_range=38.4)
test_evaluator = val_evaluator
