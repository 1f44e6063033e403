"""trainers/mm: backbone export, weights arriving in mmdet/mmseg, configs, scoped checkpoint loading,
one-line errors, and (slow) trainer -> export -> ATSS / UPerNet train + test on CPU.

The tests that need the OpenMMLab stack skip with a hint when it is missing, except under CI (``CI`` set),
where a missing stack fails: ``make test`` installs it through ``make setup-mm``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.checkpoint import save_checkpoint
from trainers.config import TrainConfig
from trainers.mm.export import ExportError, export_backbone, load_export, strip_wrappers
from trainers.models import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trainers" / "mm" / "configs"
ATSS = CONFIGS / "atss_r50_fpn_1x_coco.py"
UPERNET = CONFIGS / "upernet_r50_8xb2-80k_ade20k-512x512.py"

from mm_fixtures import needs_mm  # noqa: E402  (one probe of the OpenMMLab stack for every mm test)
# mmengine re-imports pkg_resources to resolve mmdet::/mmseg:: bases; setuptools 80 warns every time
pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:UserWarning")


def cli(*args, timeout=900, cwd=REPO):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def trainer_checkpoint(path: Path, model_file="resnet", model_name="resnet50", data="imagenet", num_classes=10,
                       wrap="", seed=0) -> dict:
    """A checkpoint in `rmix train`'s format (what trainers.classify saves), random weights."""
    torch.manual_seed(seed)
    model = build_model(model_file, model_name, num_classes, imagenet=data == "imagenet")
    with torch.no_grad():  # non-trivial BN affine and statistics, so a test would notice them being dropped
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    sd = {wrap + k: v for k, v in model.state_dict().items()}
    cfg = TrainConfig(data=data, model_file=model_file, model_name=model_name).to_dict()
    save_checkpoint(path, {"model": sd, "optimizer": {}, "scaler": {}, "epoch": 3, "step": 42, "mid_epoch": False,
                           "best": {"acc1": 12.5, "acc5": 50.0, "epoch": 2}, "loader": [], "rng": {}, "config": cfg})
    return model.state_dict()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(export path, our model's state dict) for a random ImageNet ResNet-50 saved as `rmix train` does."""
    tmp = tmp_path_factory.mktemp("export")
    ours = trainer_checkpoint(tmp / "latest.pth", wrap="module._orig_mod.")
    export_backbone(tmp / "latest.pth", tmp / "r50.pth")
    return tmp / "r50.pth", ours


# -- export (torch only) ---------------------------------------------------------------------------

def test_export_layout_is_mmpretrain_and_weights_only(export):
    path, ours = export
    obj = torch.load(path, weights_only=True)  # plain types only: no pickled classes
    assert set(obj) == {"state_dict", "meta"}
    sd = obj["state_dict"]
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    heads = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    assert len(backbone) + len(heads) == len(sd) == len(ours)
    assert set(heads) == {"fc.weight", "fc.bias", "fc_roi.weight", "fc_roi.bias"}
    for k, v in ours.items():
        assert torch.equal((heads if k.startswith(("fc.", "fc_roi.")) else backbone)[k], v), k
    meta = obj["meta"]
    assert meta["arch"] == "resnet50" and meta["epoch"] == 3 and meta["top-1"] == 12.5 and meta["num_classes"] == 10
    assert meta["config"]["model_name"] == "resnet50" and meta["config"]["schedule"] == [100, 150]
    assert load_export(path)["meta"] == meta


def test_strip_wrappers():
    sd = {"module.conv1.weight": 1, "_orig_mod.module.fc.bias": 2, "layer1.0.conv1.weight": 3}
    assert strip_wrappers(sd) == {"conv1.weight": 1, "fc.bias": 2, "layer1.0.conv1.weight": 3}


@pytest.mark.parametrize("kind, message", [
    ("missing", "no checkpoint at"),
    ("text", "is not a readable checkpoint"),
    ("pyramidnet", "was trained on cifar10"),
    ("cifar_resnet", "was trained on cifar10"),
    ("resnet18", "--model_name resnet18; only the ImageNet ResNet-50"),
    ("cifar_stem_no_config", "has a 3x3 stem (conv1), not ImageNet's 7x7"),
    ("resnet18_no_config", "not a torchvision-layout ResNet-50"),
    ("not_a_dict", "holds a list, not a training checkpoint"),
])
def test_export_refuses_what_is_not_an_imagenet_resnet50(tmp_path, kind, message):
    src = tmp_path / "ckpt.pth"
    if kind == "text":
        src.write_text("not a checkpoint\n")
    elif kind == "pyramidnet":
        trainer_checkpoint(src, "pyramidnet", "pyramidnet_164_270", "cifar10")
    elif kind == "cifar_resnet":
        trainer_checkpoint(src, "resnet", "resnet18", "cifar10")
    elif kind == "resnet18":
        trainer_checkpoint(src, "resnet", "resnet18", "imagenet")
    elif kind in ("cifar_stem_no_config", "resnet18_no_config"):
        imagenet = kind == "resnet18_no_config"
        model = build_model("resnet", "resnet18", 10, imagenet=imagenet)
        torch.save({"model": model.state_dict()}, src)
        if not imagenet:  # a CIFAR stem on ResNet-50-shaped stages is still refused for its stem
            sd = build_model("resnet", "resnet50", 10, imagenet=True).state_dict()
            sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
            torch.save({"model": sd}, src)
    elif kind == "not_a_dict":
        torch.save([1, 2, 3], src)
    with pytest.raises(ExportError, match=re.escape(message)):
        export_backbone(src, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_export_cli_one_line(tmp_path):
    trainer_checkpoint(tmp_path / "p.pth", "pyramidnet", "pyramidnet_164_270", "cifar10")
    r = cli("export-backbone", str(tmp_path / "p.pth"), str(tmp_path / "out.pth"), timeout=300)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rmix export-backbone: "), r.stderr


def test_load_export_names_a_trainer_checkpoint(tmp_path):
    trainer_checkpoint(tmp_path / "latest.pth")
    with pytest.raises(ExportError, match="export it first: rmix export-backbone"):
        load_export(tmp_path / "latest.pth")


# -- weights arrive in mmdet's and mmseg's ResNet ---------------------------------------------------

def _build_backbone(scope: str, export_path, **kw):
    if scope == "mmdet":
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = dict(type="ResNet", depth=50, norm_cfg=dict(type="BN", requires_grad=True), style="pytorch",
               init_cfg=dict(type="Pretrained", checkpoint=str(export_path), prefix="backbone."))
    cfg.update(kw)
    return MODELS.build(cfg)


def _init_weights(backbone):
    from trainers.mm.loading import mmengine_checkpoints

    with mmengine_checkpoints():
        backbone.init_weights()


@needs_mm
@pytest.mark.parametrize("scope, kw", [
    ("mmdet", dict(frozen_stages=1, norm_eval=True)),             # the ATSS config's backbone
    ("mmseg", dict(strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), contract_dilation=True)),  # UPerNet's
])
def test_every_backbone_tensor_arrives(export, scope, kw):
    path, ours = export
    backbone = _build_backbone(scope, path, **kw)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    _init_weights(backbone)
    got = backbone.state_dict()
    trunk = {k: v for k, v in ours.items() if not k.startswith(("fc.", "fc_roi."))}
    assert set(got) == set(trunk)  # same names as torchvision's: nothing missing, nothing extra
    for k, v in trunk.items():
        assert torch.equal(got[k], v), k
    # the load did something: every tensor but the BN counters (0 in both) differs from the random init
    unchanged = [k for k in got if torch.equal(got[k], before[k]) and "num_batches" not in k]
    assert not unchanged, unchanged[:5]


@needs_mm
def test_resnetv1c_cannot_hold_our_backbone(export):
    """mmseg's default UPerNet backbone is ResNetV1c (3-conv deep stem). mmengine loads our export into it
    with only a warning: the stages fill, the stem stays random. This is why our configs use plain ResNet,
    and why the config check and PretrainedBackboneCheck refuse V1c."""
    from trainers.mm.hooks import compare_backbone

    path, ours = export
    v1c = _build_backbone("mmseg", path, type="ResNetV1c")
    _init_weights(v1c)  # no exception: the failure is silent without our checks
    trunk = {k: v for k, v in ours.items() if not k.startswith(("fc.", "fc_roi."))}
    bad = compare_backbone(v1c, trunk)
    assert bad and all(k.startswith("stem.") for k in bad), bad[:5]
    assert all(torch.equal(v1c.state_dict()[k], trunk[k]) for k in trunk if k.startswith("layer"))
    assert not any(k.startswith(("conv1.", "bn1.")) for k in v1c.state_dict())  # our stem went nowhere


# -- configs ---------------------------------------------------------------------------------------

@needs_mm
def test_configs_inherit_the_stock_ones():
    from mmengine.config import Config

    atss = Config.fromfile(str(ATSS))
    assert atss.model.type == "ATSS" and atss.model.backbone.type == "ResNet" and atss.model.backbone.depth == 50
    assert atss.model.backbone.init_cfg == dict(type="Pretrained", checkpoint="checkpoints/r50_rm.pth",
                                                prefix="backbone.")
    assert atss.optim_wrapper.optimizer.lr == 0.01 and atss.train_dataloader.batch_size == 2
    assert atss.train_cfg.max_epochs == 12 and atss.param_scheduler[1].milestones == [8, 11]
    assert atss.auto_scale_lr.base_batch_size == 16
    assert "trainers.mm.hooks" in atss.custom_imports.imports
    assert {"type": "PretrainedBackboneCheck"} in atss.custom_hooks

    up = Config.fromfile(str(UPERNET))
    assert up.model.type == "EncoderDecoder" and up.model.pretrained is None
    assert up.model.backbone.type == "ResNet" and up.model.backbone.depth == 50
    assert up.model.backbone.norm_cfg.type == "SyncBN"
    assert up.model.decode_head.type == "UPerHead" and up.model.decode_head.num_classes == 150
    assert dict(up.optim_wrapper.optimizer) == dict(type="AdamW", lr=1e-4, weight_decay=1e-4)
    (poly,) = up.param_scheduler
    assert poly.type == "PolyLR" and poly.eta_min == 0.0 and poly.end == 80000 and not poly.by_epoch
    assert up.train_cfg.max_iters == 80000 and up.train_dataloader.batch_size == 2
    assert up.crop_size == (512, 512)


# -- torch.load handling, scoped -------------------------------------------------------------------

@needs_mm
def test_mmengine_checkpoints_load_only_inside_our_scope(tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer, MessageHub
    from mmengine.runner.checkpoint import _load_checkpoint

    from trainers.mm.loading import mmengine_checkpoints

    hub = MessageHub.get_instance("rmix-test")
    hub.update_scalar("train/loss", 1.5)
    hub.update_info("iter", np.int64(3))
    path = tmp_path / "iter_3.pth"
    torch.save({"meta": {"iter": 3}, "state_dict": {"w": torch.ones(2)}, "message_hub": hub.state_dict()}, path)
    assert isinstance(hub.state_dict()["log_scalars"]["train/loss"], HistoryBuffer)
    with pytest.raises(Exception, match="Weights only load failed"):
        _load_checkpoint(str(path))  # what mmengine 0.10.7 does on torch >= 2.6
    with mmengine_checkpoints():
        ckpt = _load_checkpoint(str(path))
    assert ckpt["message_hub"]["log_scalars"]["train/loss"].current() == 1.5
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)  # torch's own default is untouched after the block
    with pytest.raises(Exception, match="Weights only load failed"):
        _load_checkpoint(str(path))  # and so is mmengine's loader


# -- one-line errors -------------------------------------------------------------------------------

def _mm_main(*argv) -> str:
    from tools.mm import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return str(e.value.code)


@needs_mm
def test_mm_errors_are_one_line(tmp_path, export, monkeypatch):
    path, _ = export
    monkeypatch.chdir(tmp_path)  # the configs' default backbone path is relative: make sure it is absent
    trainer_checkpoint(tmp_path / "latest.pth")
    coco = tmp_path / "coco"
    from mm_fixtures import write_coco
    write_coco(coco, train=1, val=1)
    base = ["train", "atss_r50_fpn_1x_coco", "--work-dir", str(tmp_path / "wd")]
    assert "no config no_such_config (a path, or one of ours: atss_r50_fpn_1x_coco" in \
        _mm_main("train", "no_such_config")
    assert "data root /nonexistent/coco/ does not exist" in \
        _mm_main(*base, "--backbone", str(path), "--data-root", "/nonexistent/coco")
    assert "no backbone checkpoint at checkpoints/r50_rm.pth" in _mm_main(*base, "--data-root", str(coco))
    msg = _mm_main(*base, "--data-root", str(coco), "--backbone", str(tmp_path / "latest.pth"))
    assert "export it first: rmix export-backbone" in msg
    msg = _mm_main("train", str(UPERNET), "--backbone", str(path), "--cfg-options", "model.backbone.type=ResNetV1c")
    assert "ResNetV1c has a 3-conv deep stem" in msg
    assert "is a backbone export" in _mm_main("test", "atss_r50_fpn_1x_coco", str(path), "--data-root", str(coco))
    bad = tmp_path / "bad.py"
    bad.write_text("_base_ = 'mmdet::atss/no_such_file.py'\n")
    assert _mm_main("train", str(bad)).startswith("rmix mm train: cannot read config")
    r = cli("mm", "train", "atss_r50_fpn_1x_coco", "--backbone", str(path), "--data-root", str(tmp_path / "none"),
            timeout=300)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert r.stderr.startswith("rmix mm train: train_dataloader: data root")


# -- end to end: our trainer -> export -> ATSS / UPerNet on CPU -------------------------------------

ATSS_TINY = """
_base_ = '{base}'
img_scale = (320, 320)
metainfo = dict(classes=('person', 'dog', 'bottle'))  # the categories of mm_fixtures.write_coco's boxes (BOX_IDS)
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True), dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(num_workers=0, persistent_workers=False,
                        dataset=dict(metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
# an untrained head scores below 0.05: keep boxes for the mAP
model = dict(bbox_head=dict(num_classes=3), test_cfg=dict(score_thr=0.0))
train_cfg = dict(max_epochs=1, val_interval=1)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), visualization=dict(draw=False))
log_processor = dict(window_size=1)
"""

UPERNET_TINY = """
_base_ = '{base}'
crop_size = (256, 256)
# Narrow heads: the stock 512 channels cost several times the backbone's compute at these crops and
# hundreds of MB per checkpoint; the head's width is not what these tests check.
model = dict(data_preprocessor=dict(size=crop_size), decode_head=dict(channels=64), auxiliary_head=dict(channels=64))
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(512, 256), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75), dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'), dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=(512, 256), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True), dict(type='PackSegInputs')]
train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=1, val_interval=1)
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=3, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1), visualization=dict(draw=False))
log_processor = dict(window_size=1)
"""


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Our trainer pre-trains the ImageNet ResNet-50 (RecursiveMix, one step) on a tiny ImageNet; export it."""
    from conftest import write_imagefolder
    from shards.build import ShardParams, build
    from trainers.classify import run

    tmp = tmp_path_factory.mktemp("pretrain")
    src = write_imagefolder(tmp / "imagenet", per_class=2, val_per_class=1, oddities=False)
    build(ShardParams(dataset="imagenet", formats=["wds"], samples_per_shard=8), src, tmp / "shards",
          workers=1, progress=False)
    cfg = TrainConfig(name="r50", data="imagenet", data_dir=str(tmp / "shards" / "imagenet"), save_dir=str(tmp),
                      model_file="resnet", model_name="resnet50", epoch=1, batch_size=4, lr=0.01, loader="torch",
                      num_workers=1, aug="recursive_mix", aug_alpha=0.5, aug_omega=0.5, print_freq=1).validate()
    run(cfg)
    ckpt = tmp / "imagenet" / "r50" / "latest.pth"
    r = cli("export-backbone", str(ckpt), str(tmp / "r50_rm.pth"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rmix export-backbone: " in r.stdout and "aug recursive_mix" in r.stdout
    trained = torch.load(ckpt, weights_only=False)["model"]
    return tmp / "r50_rm.pth", trained


def _tiny_config(tmp: Path, template: str, base: Path) -> Path:
    path = tmp / f"tiny_{base.stem}.py"
    path.write_text(template.format(base=base))
    return path


def _final(stdout: str, prefix: str) -> dict:
    m = re.findall(rf"^{prefix} (\{{.*\}})$", stdout, flags=re.M)
    assert m, stdout[-3000:]
    return json.loads(m[-1])


@needs_mm
@pytest.mark.slow
def test_atss_trains_and_tests_from_our_backbone(tmp_path, pretrained):
    from mm_fixtures import write_coco

    export_path, trained = pretrained
    coco = write_coco(tmp_path / "coco", train=4, val=2, size=(320, 320))
    cfg = _tiny_config(tmp_path, ATSS_TINY, ATSS)
    wd = tmp_path / "wd"
    r = cli("mm", "train", str(cfg), "--backbone", str(export_path), "--data-root", str(coco), "--work-dir", str(wd))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert re.search(r"PretrainedBackboneCheck: all 318 backbone tensors equal", out), out[-3000:]
    losses = [float(v) for v in re.findall(r"\bloss: (\S+)", out)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    metrics = _final(r.stdout, "rmix mm train: final val")
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0, metrics
    # the weights at iteration 0 were ours: frozen stem + stage 1 (frozen_stages=1) still equal them
    ckpt = torch.load(wd / "epoch_1.pth", weights_only=False)["state_dict"]
    for k, v in trained.items():
        if k.startswith(("conv1.", "layer1.")) and "num_batches" not in k:
            assert torch.equal(ckpt["backbone." + k], v), k
    t = cli("mm", "test", str(cfg), str(wd / "epoch_1.pth"), "--data-root", str(coco), "--work-dir", str(wd))
    assert t.returncode == 0, (t.stdout + t.stderr)[-4000:]
    assert _final(t.stdout, "rmix mm test:")["coco/bbox_mAP"] == pytest.approx(metrics["coco/bbox_mAP"], abs=1e-3)


@needs_mm
@pytest.mark.slow
def test_upernet_trains_resumes_and_tests_from_our_backbone(tmp_path, pretrained):
    from mm_fixtures import write_ade20k

    export_path, _ = pretrained
    ade = write_ade20k(tmp_path / "ade", train=4, val=1, size=(256, 320))
    cfg = _tiny_config(tmp_path, UPERNET_TINY, UPERNET)
    wd = tmp_path / "wd"
    common = ["--backbone", str(export_path), "--data-root", str(ade), "--work-dir", str(wd)]
    r = cli("mm", "train", str(cfg), *common)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "PretrainedBackboneCheck: all 318 backbone tensors equal" in out
    losses = [float(v) for v in re.findall(r"\bloss: (\S+)", out)]
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses))), losses
    metrics = _final(r.stdout, "rmix mm train: final val")
    assert 0.0 <= metrics["mIoU"] <= 100.0, metrics
    assert (wd / "iter_1.pth").is_file()

    # --resume: mmengine's own checkpoint (MessageHub, numpy) loads through our scoped loader
    r2 = cli("mm", "train", str(cfg), *common, "--resume", "--cfg-options", "train_cfg.max_iters=2",
             "train_cfg.val_interval=2")
    out2 = r2.stdout + r2.stderr
    assert r2.returncode == 0, out2[-4000:]
    assert "resumed" in out2.lower(), out2[-3000:]
    assert "Iter(train) [2/2]" in out2 and "Iter(train) [1/2]" not in out2  # continued at iteration 2
    t = cli("mm", "test", str(cfg), str(wd / "iter_2.pth"), "--data-root", str(ade), "--work-dir", str(wd))
    assert t.returncode == 0, (t.stdout + t.stderr)[-4000:]
    assert 0.0 <= _final(t.stdout, "rmix mm test:")["mIoU"] <= 100.0


@needs_mm
@pytest.mark.slow
def test_upernet_under_torchrun_on_cpu(tmp_path, export):
    """Two CPU ranks: gloo process group, BN for SyncBN, DDP without device_ids; rank 0 alone reports."""
    from mm_fixtures import write_ade20k

    path, _ = export
    ade = write_ade20k(tmp_path / "ade", train=4, val=1, size=(256, 320))
    cfg = _tiny_config(tmp_path, UPERNET_TINY, UPERNET)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        "-m", "tools.mm", "train", str(cfg), "--backbone", str(path), "--data-root", str(ade),
                        "--work-dir", str(tmp_path / "wd"), "--cfg-options", "train_cfg.max_iters=1",
                        "train_cfg.val_interval=1"], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Distributed training: True" in out and "PretrainedBackboneCheck: all 318" in out
    assert len(re.findall(r"^rmix mm train: final val ", r.stdout, flags=re.M)) == 1
    assert (tmp_path / "wd" / "iter_1.pth").is_file()


def random_detector(cfg_path: Path, out: Path) -> Path:
    """A checkpoint of the config's detector with seeded random weights, as mmengine saves one."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(str(cfg_path))
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    torch.save({"meta": {}, "state_dict": MODELS.build(cfg.model).state_dict()}, out)
    return out


@needs_mm
@pytest.mark.slow
def test_dali_eval_under_torchrun_counts_every_image_once(tmp_path):
    """`rmix mm test --loader dali` on 3 validation images: 2 CPU ranks (gloo) give the 1-rank run's metric and
    its detections, for every image exactly once (mmengine's gather keeps as many results per rank as the
    shortest rank has, and DALI's own sharding splits 3 images 1 + 2)."""
    from mm_fixtures import free_port, write_coco

    coco = write_coco(tmp_path / "coco", train=1, val=3, size=(320, 320))
    cfg = _tiny_config(tmp_path, ATSS_TINY, ATSS)
    ckpt = random_detector(cfg, tmp_path / "atss_random.pth")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread in both runs: the same float sums

    def test(world: int):
        prefix = tmp_path / f"dets_{world}"
        args = ["-m", "tools.mm", "test", str(cfg), str(ckpt), "--data-root", str(coco), "--loader", "dali",
                "--work-dir", str(tmp_path / f"wd{world}"), "--cfg-options", f"test_evaluator.outfile_prefix={prefix}"]
        if world > 1:
            args = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}", *args]
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert len(re.findall(r"^rmix mm test: ", r.stdout, flags=re.M)) == 1
        dets = json.loads(Path(f"{prefix}.bbox.json").read_text())
        return _final(r.stdout, "rmix mm test:"), sorted(dets, key=lambda d: (d["image_id"], -d["score"], d["bbox"]))

    one, dets_one = test(1)
    two, dets_two = test(2)
    val_ids = {im["id"] for im in json.loads((coco / "annotations" / "instances_val2017.json").read_text())["images"]}
    assert {d["image_id"] for d in dets_one} == val_ids
    assert two == one
    classes = [(d["image_id"], d["category_id"]) for d in dets_one]
    assert [(d["image_id"], d["category_id"]) for d in dets_two] == classes
    assert torch.allclose(torch.tensor([d["bbox"] + [d["score"]] for d in dets_two]),
                          torch.tensor([d["bbox"] + [d["score"]] for d in dets_one]), atol=1e-4)


@needs_mm
@pytest.mark.slow
def test_ddp_resume_gives_each_rank_its_own_dense_mix(tmp_path, export):
    """Two CPU ranks, UPerNet fed by our DALI loader with dense RM, 3 iterations: every checkpoint holds each
    rank's own mix (mmengine writes checkpoints on rank 0 alone), and resumed from iteration 2 both ranks end
    with the uninterrupted run's generator and history; the ranks' states differ, so a resume that handed
    rank 0's state to both would fail here."""
    from mm_fixtures import write_ade20k

    from trainers.mm.loading import load_from_local_weights_only

    path, _ = export
    ade = write_ade20k(tmp_path / "ade", train=6, val=2, size=(256, 320))  # a val image per rank
    cfg = _tiny_config(tmp_path, UPERNET_TINY, UPERNET)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def train(work: Path, *extra):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_port=29543", "-m", "tools.mm", "train", str(cfg), "--backbone", str(path),
                            "--data-root", str(ade), "--work-dir", str(work), "--loader", "dali", "--rm-alpha", "0.5",
                            "--cfg-options", "train_cfg.max_iters=3", "train_cfg.val_interval=100",
                            "default_hooks.checkpoint.interval=2", *extra],
                           capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return load_from_local_weights_only(str(work / "iter_3.pth"), map_location="cpu")["rmix_dense_mix"]["ranks"]

    whole = train(tmp_path / "whole")
    resumed = train(tmp_path / "resumed", "--resume", str(tmp_path / "whole" / "iter_2.pth"))
    assert len(whole) == len(resumed) == 2
    assert whole[0]["loader"]["rng"] != whole[1]["loader"]["rng"]
    for a, b in zip(whole, resumed):
        assert a["loader"]["rng"] == b["loader"]["rng"]
        for key in ("images", "seg"):
            assert torch.equal(a["loader"]["history"][key], b["loader"]["history"][key]), key


# -- exports of a checkpoint saved before any evaluation; a text file as --backbone -----------------

def test_export_of_a_never_evaluated_checkpoint_says_na(tmp_path, capsys):
    """`rmix train` stopped after one step saves latest.pth before its first evaluation: its `best` is the
    trainer's initial {acc1: 0.0, epoch: 0}, which is no accuracy. The export says n/a, not top-1 0.00."""
    from conftest import write_imagefolder
    from shards.build import ShardParams, build
    from tools.mm import export_main
    from trainers.classify import run

    src = write_imagefolder(tmp_path / "imagenet", per_class=2, val_per_class=1, oddities=False)
    build(ShardParams(dataset="imagenet", formats=["wds"], samples_per_shard=8), src, tmp_path / "shards",
          workers=1, progress=False)
    cfg = TrainConfig(name="r50", data="imagenet", data_dir=str(tmp_path / "shards" / "imagenet"),
                      save_dir=str(tmp_path), model_file="resnet", model_name="resnet50", epoch=1, batch_size=4,
                      lr=0.01, loader="torch", num_workers=1, stop_after_steps=1, print_freq=1).validate()
    run(cfg)
    ckpt = tmp_path / "imagenet" / "r50" / "latest.pth"
    assert torch.load(ckpt, weights_only=False)["best"]["acc1"] == 0.0  # the trainer's initial value
    capsys.readouterr()
    export_main([str(ckpt), str(tmp_path / "r50.pth")])
    out = capsys.readouterr().out
    assert "top-1 n/a" in out and "top-1 0.00" not in out, out
    meta = load_export(tmp_path / "r50.pth")["meta"]
    assert meta["top-1"] is None and meta["top-5"] is None and meta["best_epoch"] is None and meta["epoch"] == 1


@pytest.mark.parametrize("text", ["hello world\n", "epoch 1\n"])
def test_load_export_of_a_text_file_is_one_line(tmp_path, text):
    path = tmp_path / "r50.pth"
    path.write_text(text)
    with pytest.raises(ExportError, match="is not a readable checkpoint: neither torch.save's zip format"):
        load_export(path)


@needs_mm
def test_mm_train_backbone_text_file_is_one_line(tmp_path):
    path = tmp_path / "r50.pth"
    path.write_text("hello world\n")
    msg = _mm_main("train", "atss_r50_fpn_1x_coco", "--backbone", str(path))
    assert msg == f"rmix mm train: --backbone: {path} is not a readable checkpoint: neither torch.save's zip " \
                  "format nor a pickle (a text file?)", msg


# -- the data, checked before either loader is built ------------------------------------------------

def _break_data(case: str, root: Path) -> None:
    """Damage a fresh fixture the way real data goes wrong."""
    import numpy as np
    from PIL import Image

    val_json = root / "annotations" / "instances_val2017.json"
    if case == "coco_not_json":  # a download cut short
        text = val_json.read_text()
        val_json.write_text(text[:len(text) // 2])
    elif case == "coco_no_images":  # e.g. a results file passed as annotations
        val_json.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 9, 9], "score": 0.5}]))
    elif case == "coco_image_missing":
        first = json.loads(val_json.read_text())["images"][0]["file_name"]
        (root / "val2017" / first).unlink()
    elif case == "coco_empty_val":
        doc = json.loads(val_json.read_text())
        val_json.write_text(json.dumps(dict(doc, images=[], annotations=[])))
    elif case == "ade_empty_val":
        for p in (root / "images" / "validation").iterdir():
            p.unlink()
    elif case == "ade_label_missing":
        next(iter(sorted((root / "annotations" / "training").iterdir()))).unlink()
    elif case == "ade_label_size":  # a label map of another resolution than its image
        p = sorted((root / "annotations" / "training").iterdir())[1]
        Image.open(p).resize((160, 128), Image.NEAREST).save(p)
    elif case == "ade_label_value":  # another dataset's labels: 200 is no ADE20K class
        p = sorted((root / "annotations" / "validation").iterdir())[0]
        labels = np.array(Image.open(p))
        labels[:8, :8] = 200
        Image.fromarray(labels).save(p)
    else:
        raise ValueError(case)


@needs_mm
@pytest.mark.parametrize("loader", ["stock", "dali"])
@pytest.mark.parametrize("case, message", [pytest.param(*case, id=case[0]) for case in [
    ("coco_not_json", "instances_val2017.json is not valid JSON (line 1 column"),
    ("coco_no_images", "instances_val2017.json is not a COCO annotation file: it has no 'images' list"),
    ("coco_image_missing", "val_dataloader: 1 of the 2 images"),
    ("coco_empty_val", "val_dataloader: {root}/annotations/instances_val2017.json lists no images: the val set is empty"),
    ("ade_empty_val", "val_dataloader: no *.jpg images in {root}/images/validation: the val set is empty"),
    ("ade_label_missing", "train_dataloader: 1 of the 4 label maps are missing (first: {root}/annotations/training/"),
    ("ade_label_size", "is 160x128, its image {root}/images/training/ADE_train_00000002.jpg 320x256: they must"),
    ("ade_label_value", "ADE_val_00000001.png holds 200: ADE20K's labels are 0..150 and 255 (ignored)"),
]])
def test_bad_data_is_one_line_before_any_loader(tmp_path, export, case, message, loader):
    """What mmdet / mmseg would fail on with a traceback (some after an epoch of training) is one line, said
    before the Runner and its loaders exist (the work dir is never made), for mmengine's loader and ours."""
    from mm_fixtures import write_ade20k, write_coco

    path, _ = export
    if case.startswith("coco"):
        root = write_coco(tmp_path / "coco", train=2, val=2, size=(256, 320))
        cfg = _tiny_config(tmp_path, ATSS_TINY, ATSS)
    else:
        root = write_ade20k(tmp_path / "ade", train=4, val=2, size=(256, 320))
        cfg = _tiny_config(tmp_path, UPERNET_TINY, UPERNET)
    _break_data(case, root)
    wd = tmp_path / "wd"
    msg = _mm_main("train", str(cfg), "--backbone", str(path), "--data-root", str(root), "--work-dir", str(wd),
                   "--loader", loader)
    assert msg.startswith("rmix mm train: ") and message.format(root=root) in msg and "\n" not in msg, msg
    assert not wd.exists()


@needs_mm
def test_coco_categories_must_cover_the_models_classes(tmp_path, export):
    """A 4-category COCO file under the stock 80-class ATSS: mmdet's CocoMetric maps predicted label i to the i-th
    category and raised IndexError after the first epoch. Refused up front, for training and test."""
    from mm_fixtures import coco_categories, write_coco

    path, _ = export
    coco = write_coco(tmp_path / "coco", train=2, val=1, categories=coco_categories(1, 18, 44))
    for split in ("train", "val"):
        ann = coco / "annotations" / f"instances_{split}2017.json"
        doc = json.loads(ann.read_text())
        doc["categories"].append({"id": 4, "name": "motorcycle", "supercategory": "vehicle"})
        ann.write_text(json.dumps(doc))
    for loader in ("stock", "dali"):
        msg = _mm_main("train", "atss_r50_fpn_1x_coco", "--backbone", str(path), "--data-root", str(coco),
                       "--work-dir", str(tmp_path / "wd"), "--loader", loader)
        assert "instances_train2017.json has categories for 4 of the 80 classes the model predicts (missing: " \
               "'bicycle', 'car', 'airplane' ...)" in msg and "\n" not in msg, msg
    # the config's classes cover the file, the head predicts more: the same IndexError
    tiny = _tiny_config(tmp_path, ATSS_TINY, ATSS)
    msg = _mm_main("train", str(tiny), "--backbone", str(path), "--data-root", str(coco), "--work-dir",
                   str(tmp_path / "wd"), "--cfg-options", "model.bbox_head.num_classes=5")
    assert "has categories for 3 of the 5 classes the model predicts (the head's num_classes is 5, the config " \
           "names 3 classes)" in msg, msg
    assert not (tmp_path / "wd").exists()


# -- dense RecursiveMix in the config and in the DALI loader ----------------------------------------

@needs_mm
@pytest.mark.parametrize("task", ["det", "seg"])
def test_rm_alpha_with_a_densrm_config_is_refused(tmp_path, export, task):
    """A *_densrm config mixes in the model's data preprocessor; --loader dali --rm-alpha mixes in the loader too.
    Both would run, one on the other's output: refused in one line, before anything is built."""
    from mm_fixtures import write_ade20k, write_coco

    path, _ = export
    if task == "det":
        root = write_coco(tmp_path / "coco", train=2, val=1, size=(256, 320))
        cfg = _tiny_config(tmp_path, ATSS_TINY, CONFIGS / "atss_r50_fpn_1x_coco_densrm.py")
    else:
        root = write_ade20k(tmp_path / "ade", train=2, val=1, size=(256, 320))
        cfg = _tiny_config(tmp_path, UPERNET_TINY, CONFIGS / "upernet_r50_8xb2-80k_ade20k-512x512_densrm.py")
    wd = tmp_path / "wd"
    msg = _mm_main("train", str(cfg), "--backbone", str(path), "--data-root", str(root), "--work-dir", str(wd),
                   "--loader", "dali", "--rm-alpha", "0.5")
    assert msg.startswith(f"rmix mm train: --rm-alpha mixes in the DALI loader and {cfg} already mixes in the "
                          "model's data preprocessor"), msg
    assert "RecursiveMix would run twice" in msg and "\n" not in msg and not wd.exists(), msg


# -- test checkpoints that do not fit; metrics as valid, rounded JSON --------------------------------

@pytest.fixture(scope="module")
def upernet_checkpoint(tmp_path_factory):
    """(tiny UPerNet config, a checkpoint of it in mmengine's layout): the model the config builds, its state
    dict saved as mmengine's Runner saves one (``meta`` + ``state_dict``), random weights."""
    from mmengine.config import Config
    from mmengine.runner.checkpoint import get_state_dict, weights_to_cpu
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from trainers.mm.launch import adapt_to_device

    tmp = tmp_path_factory.mktemp("upernet_ckpt")
    path = _tiny_config(tmp, UPERNET_TINY, UPERNET)
    cfg = Config.fromfile(str(path))
    adapt_to_device(cfg, cuda=False)
    cfg.model.backbone.init_cfg = None
    register_all_modules(init_default_scope=True)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({"meta": {"iter": 1, "epoch": 0}, "state_dict": weights_to_cpu(get_state_dict(model))},
               tmp / "iter_1.pth")
    return path, tmp / "iter_1.pth"


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@needs_mm
@pytest.mark.slow
def test_mm_test_refuses_a_checkpoint_of_another_config(tmp_path, upernet_checkpoint):
    """An ATSS config tested with a UPerNet checkpoint: mmengine loads with strict=False, the ATSS neck and head
    stay random and the run printed mAP 0.0 with exit 0. One line instead, naming what does not fit."""
    from mm_fixtures import write_coco

    _, ckpt = upernet_checkpoint
    coco = write_coco(tmp_path / "coco", train=1, val=1)
    cfg = _tiny_config(tmp_path, ATSS_TINY, ATSS)
    r = cli("mm", "test", str(cfg), str(ckpt), "--data-root", str(coco), "--work-dir", str(tmp_path / "wd"))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stderr.startswith(f"rmix mm test: {ckpt} does not fit {cfg}: "), r.stderr
    assert "tensors are not in it (first: neck." in r.stderr and "(first: decode_head." in r.stderr, r.stderr
    assert "coco/bbox_mAP" not in r.stdout and not (tmp_path / "wd").exists()  # refused before the Runner


@needs_mm
@pytest.mark.slow
def test_mm_test_prints_valid_rounded_json(tmp_path, upernet_checkpoint):
    """mmseg's metrics are float32 (printed as 0.05999999865889549) and NaN where no pixel is labelled (a val set
    all "other"): `rmix mm test` prints valid JSON, rounded, with null for NaN."""
    import numpy as np
    from PIL import Image

    from mm_fixtures import write_ade20k

    cfg, ckpt = upernet_checkpoint
    ade = write_ade20k(tmp_path / "ade", train=1, val=1, size=(256, 320))
    (val,) = (ade / "annotations" / "validation").iterdir()  # every class in a stripe: an untrained model's
    Image.fromarray((np.arange(320) * 150 // 320 + 1).astype(np.uint8)[None].repeat(256, 0)).save(val)  # hits > 0
    r = cli("mm", "test", str(cfg), str(ckpt), "--data-root", str(ade), "--work-dir", str(tmp_path / "wd"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    line = re.findall(r"^rmix mm test: (.*)$", r.stdout, flags=re.M)[-1]
    metrics = _strict_json(line)
    assert set(metrics) >= {"aAcc", "mIoU", "mAcc"}, metrics
    assert all(isinstance(v, float) and v == round(v, 4) for v in metrics.values()) and metrics["aAcc"] > 0, line

    for p in (ade / "annotations" / "validation").iterdir():  # every pixel "other": ignored after reduce_zero_label
        Image.fromarray(np.zeros_like(np.array(Image.open(p)))).save(p)
    r = cli("mm", "test", str(cfg), str(ckpt), "--data-root", str(ade), "--work-dir", str(tmp_path / "wd"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    line = re.findall(r"^rmix mm test: (.*)$", r.stdout, flags=re.M)[-1]
    assert _strict_json(line)["aAcc"] is None, line
