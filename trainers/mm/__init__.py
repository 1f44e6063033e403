"""mmdet / mmseg adapters: our ImageNet ResNet-50 (pre-trained with RecursiveMix) in ATSS and UPerNet.

The seed (Yang et al., RecursiveMix, arXiv:2203.06844) reports its classification gains carrying over to
COCO detection (ATSS R-50 FPN 1x: 39.4 baseline, 40.1 CutMix, 41.5 RecursiveMix box AP) and ADE20K
segmentation (UPerNet R-50 80k: 40.40 / 41.24 / 42.30 mIoU) by loading the ImageNet backbone into stock
OpenMMLab configs. This package is that path, downstream of ``trainers.classify``:

    export.py    trainer checkpoint -> mmpretrain-layout ``backbone.*`` file; refuses non-ResNet-50s
    loading.py   mmengine's torch.load under torch >= 2.6, scoped to our calls (weights_only + allowlist)
    hooks.py     PretrainedBackboneCheck: the run fails unless the backbone equals the checkpoint at iter 0;
                 DenseMixState: the dense mix's generator and history in checkpoints, restored on resume;
                 DaliReaderState: our DALI reader's per-rank state in checkpoints, restored on resume
    launch.py    ``rmix mm train|test``: config and checkpoint checks, launcher, mmengine Runner, metrics JSON
    data.py      the data a config names, checked before any loader is built (COCO JSON, images on disk,
                 empty sets, ADE20K label maps, categories against the model's classes): one line each
    dense_mix.py RecursiveMix for boxes and masks inside mmdet (batch_augments) / mmseg (data preprocessor)
    dali_loop.py our DALI detection / segmentation loaders in place of mmengine's DataLoader
    configs/     ATSS and UPerNet configs inheriting mmdet:: / mmseg:: bases (``*_densrm``: dense RM on)

``export`` needs only torch; the rest needs the OpenMMLab stack (``make setup-mm``).
"""
