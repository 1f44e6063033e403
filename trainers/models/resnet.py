"""ResNets with the ROI head, built on torchvision's ResNet so parameter names are torchvision's.

``resnet50`` (ImageNet) is ``torchvision.models.ResNet`` with Bottleneck blocks plus ``fc_roi``: its
state_dict loads into ``torchvision.models.resnet50`` and, minus the heads, into mmdet/mmseg's ResNet-50
backbone without renaming. ``resnet18`` for CIFAR swaps the stem for a 3x3 stride-1 convolution and
no max-pool (the usual CIFAR ResNet), keeping the same names.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .roi import RoiClassifier


class RoiResNet(RoiClassifier, ResNet):
    def __init__(self, block, layers, num_classes: int = 1000, cifar_stem: bool = False, **kw):
        ResNet.__init__(self, block, layers, num_classes=num_classes, **kw)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.fc_roi = nn.Linear(self.fc.in_features, num_classes)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    forward = RoiClassifier.forward


def resnet50(num_classes: int = 1000) -> RoiResNet:
    return RoiResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


def resnet18(num_classes: int = 1000) -> RoiResNet:
    return RoiResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def cifar_resnet18(num_classes: int = 10) -> RoiResNet:
    return RoiResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, cifar_stem=True)
