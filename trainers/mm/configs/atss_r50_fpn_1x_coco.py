# ATSS R-50 FPN 1x on COCO with our ImageNet ResNet-50: the seed's detection table
# (baseline 39.4, + CutMix 40.1, + RecursiveMix 41.5 box AP).
#
# mmdet's stock config, inherited unchanged (SGD lr 0.01, 8 GPUs x 2 images, 12 epochs, lr steps at
# epochs 8 and 11, linear warm-up over 500 iterations, plain `ResNet` depth 50 style 'pytorch',
# frozen stem + stage 1, BN in eval mode), except where the backbone's weights come from: our export
# (`rmix export-backbone`) instead of torchvision's. The three rows differ only in that checkpoint:
#
#   rmix mm train atss_r50_fpn_1x_coco --backbone checkpoints/r50_rm.pth
#
# `rmix mm train --backbone` rewrites `checkpoint` below; PretrainedBackboneCheck fails the run before
# iteration 0 unless every backbone tensor equals the checkpoint (mmengine itself only warns).
_base_ = 'mmdet::atss/atss_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['trainers.mm.hooks'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='ResNet',
        depth=50,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/r50_rm.pth', prefix='backbone.')))

custom_hooks = [dict(type='PretrainedBackboneCheck'), dict(type='DenseMixState')]
