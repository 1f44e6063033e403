"""Models with RecursiveMix's ROI head: ``model(x, boxes=None, share_fc=False)`` returns logits, or
``(logits, roi_logits)`` when boxes are given.

Looked up by the seed's ``--model_file`` / ``--model_name`` pair; ImageNet and CIFAR models live in
separate tables as in the seed (``models_imagenet`` vs ``models_cifar``).
"""

from __future__ import annotations

from .pyramidnet import pyramidnet_164_270, pyramidnet_200_240
from .resnet import cifar_resnet18, resnet18, resnet50
from .roi import RoiClassifier
from .small import small_cnn

CIFAR_MODELS = {
    ("pyramidnet", "pyramidnet_200_240"): pyramidnet_200_240,
    ("pyramidnet", "pyramidnet_164_270"): pyramidnet_164_270,
    ("resnet", "resnet18"): cifar_resnet18,
    ("small", "small_cnn"): small_cnn,
}
IMAGENET_MODELS = {
    ("resnet", "resnet50"): resnet50,
    ("resnet", "resnet18"): resnet18,
}


def build_model(model_file: str, model_name: str, num_classes: int, imagenet: bool) -> RoiClassifier:
    table = IMAGENET_MODELS if imagenet else CIFAR_MODELS
    try:
        return table[(model_file, model_name)](num_classes=num_classes)
    except KeyError:
        known = ", ".join(f"{f}/{n}" for f, n in table)
        kind = "ImageNet" if imagenet else "CIFAR-size"
        raise ValueError(f"unknown {kind} model --model_file {model_file} --model_name {model_name}; known: {known}") from None
