# UPerNet R-50 on ADE20K 512x512 80k, our backbone, with dense RecursiveMix switched on in training
# (rmix.dense): the previous mixed batch (images and label maps), resized into one box of side
# sqrt(U(0, 0.5)) of the crop, pasted over the current batch; label maps resized with nearest, so the
# ignore label 255 (padding, "other" after reduce_zero_label) survives. An iteration-based schedule has
# no epochs, so the history is never cleared.
#
#   torchrun --nproc_per_node=8 -m tools.mm train upernet_r50_8xb2-80k_ade20k-512x512_densrm \
#       --backbone checkpoints/r50_rm.pth
#
# mmseg 1.2.2 calls `batch_augments` as one callable, so the mix is a SegDataPreProcessor subclass that
# keeps every setting of the base config's preprocessor (mean, std, bgr_to_rgb, size, pad values).
_base_ = './upernet_r50_8xb2-80k_ade20k-512x512.py'

custom_imports = dict(imports=['trainers.mm.hooks', 'trainers.mm.dense_mix'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(
        type='RecursiveMixSegDataPreProcessor',
        rmix=dict(alpha=0.5, box='batch', interpolation='nearest', keep_history_across_epochs=False, seed=0)))
