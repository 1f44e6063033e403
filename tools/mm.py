"""``rmix export-backbone`` and ``rmix mm train|test``: our ResNet-50 in mmdet / mmseg.

    rmix export-backbone logs/imagenet/rm/best.pth checkpoints/r50_rm.pth
    rmix mm train atss_r50_fpn_1x_coco --backbone checkpoints/r50_rm.pth [--work-dir DIR] [--resume [CKPT]]
    torchrun --nproc_per_node=8 -m tools.mm train upernet_r50_8xb2-80k_ade20k-512x512 --backbone ...
    rmix mm test atss_r50_fpn_1x_coco work_dirs/atss_r50_fpn_1x_coco/epoch_12.pth

CONFIG is a path or the name of one of ours (``trainers/mm/configs/``). Bad input ends in one line
on stderr and exit status 1; the work lives in :mod:`trainers.mm`.
"""

from __future__ import annotations

import argparse
import sys


def export_main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="rmix export-backbone",
        description="Turn a `rmix train` checkpoint of the ImageNet ResNet-50 into the mmpretrain layout "
                    "that mmdet/mmseg load as a pretrained backbone (init_cfg prefix='backbone.').")
    p.add_argument("ckpt", help="trainer checkpoint: best.pth or latest.pth")
    p.add_argument("out", help="where to write the export, e.g. checkpoints/r50_rm.pth")
    args = p.parse_args(argv)
    from trainers.mm.export import ExportError, export_backbone

    try:
        meta = export_backbone(args.ckpt, args.out)
    except ExportError as e:
        sys.exit(f"rmix export-backbone: {e}")
    top1 = f"{meta['top-1']:.2f}" if isinstance(meta.get("top-1"), (int, float)) else "n/a"
    print(f"rmix export-backbone: {args.out} (resnet50, epoch {meta['epoch']}, top-1 {top1}, aug {meta['aug']})")


def _parse_cfg_options(values) -> dict:
    if not values:
        return {}
    from mmengine.config import DictAction

    ns = argparse.Namespace()
    DictAction(option_strings=["--cfg-options"], dest="cfg_options")(None, ns, values)
    return ns.cfg_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmix mm", description="mmdet / mmseg runs with our ResNet-50 backbone.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{train,test}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("config", help="config path, or one of ours: atss_r50_fpn_1x_coco, "
                                       "upernet_r50_8xb2-80k_ade20k-512x512")
    common.add_argument("--loader", choices=["stock", "dali"], default="stock",
                        help="dali: our DALI loaders (pipelines/dali_det.py, dali_seg.py) instead of mmengine's DataLoader")
    common.add_argument("--work-dir", help="logs and checkpoints (default work_dirs/<config name>)")
    common.add_argument("--data-root", help="dataset root, e.g. data/coco or data/ade/ADEChallengeData2016")
    common.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE",
                        help="override config entries, as mmdet/mmseg's tools (e.g. train_dataloader.batch_size=4)")
    t = sub.add_parser("train", parents=[common], help="train a config (one process, or under torchrun)")
    t.add_argument("--rm-alpha", type=float, help="with --loader dali: dense RecursiveMix (alpha) inside the train loader")
    t.add_argument("--backbone", help="our export (rmix export-backbone) to initialise model.backbone from")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="resume: alone, from the latest checkpoint in the work dir (refused when there is none); "
                        "with a path, from that checkpoint; 'auto': the latest if there is one, else start fresh")
    e = sub.add_parser("test", parents=[common], help="evaluate a trained checkpoint on the test split")
    e.add_argument("checkpoint", help="a trained checkpoint from the work dir (epoch_N.pth / iter_N.pth)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    import warnings

    from trainers.mm.launch import PKG_RESOURCES_WARNING, MMArgs, MMError, require_stack, test, train

    # mmengine re-imports pkg_resources whenever it resolves an mmdet::/mmseg:: name; setuptools 80 then
    # warns each time that pkg_resources is deprecated. Known, harmless noise in this command's process.
    warnings.filterwarnings("ignore", message=PKG_RESOURCES_WARNING)

    try:
        require_stack()
        run = MMArgs(config=args.config, work_dir=args.work_dir, data_root=args.data_root,
                     cfg_options=_parse_cfg_options(args.cfg_options),
                     backbone=getattr(args, "backbone", None), resume=getattr(args, "resume", None),
                     checkpoint=getattr(args, "checkpoint", None), loader=args.loader,
                     rm_alpha=getattr(args, "rm_alpha", None))
        train(run) if args.cmd == "train" else test(run)
        _leave_process_group(wait=True)
    except MMError as e:
        _leave_process_group(wait=False)
        sys.exit(f"rmix mm {args.cmd}: {e}")


def _leave_process_group(wait: bool) -> None:
    """Destroy the process group (torchrun) before the interpreter exits, after every rank is done when ``wait``:
    gloo's threads torn down while Python clears its modules can abort the process ("terminate called without an
    active exception", seen once in CI with two CPU ranks)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
