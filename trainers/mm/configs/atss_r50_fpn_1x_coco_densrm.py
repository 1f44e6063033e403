# ATSS R-50 FPN 1x on COCO, our backbone, with dense RecursiveMix switched on in training (rmix.dense):
# the previous mixed batch, resized into one box of side sqrt(U(0, 0.5)) of the padded image, pasted over
# the current batch with its boxes; current boxes less than 30 % visible are dropped, boxes whose side
# band the paste covers are shrunk to their visible part. History is cleared every epoch (the seed's rule).
#
#   rmix mm train atss_r50_fpn_1x_coco_densrm --backbone checkpoints/r50_rm.pth
#
# Everything else is atss_r50_fpn_1x_coco.py (our backbone, stock schedule) unchanged.
_base_ = './atss_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['trainers.mm.hooks', 'trainers.mm.dense_mix'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(
        batch_augments=[
            dict(type='DetRecursiveMixAug', alpha=0.5, box='batch', min_visible=0.3, clip='visible_bbox',
                 min_size=1.0, interpolation='nearest', keep_history_across_epochs=False, seed=0)
        ]))
