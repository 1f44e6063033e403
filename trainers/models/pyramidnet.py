"""PyramidNet for CIFAR (Han et al. 2017, "Deep Pyramidal Residual Networks"), bottleneck variant, with
the ROI head: widths grow linearly by ``alpha`` over all blocks, zero-padded identity shortcuts,
BN-ReLU placement of the paper. ``pyramidnet_200_240`` is the seed's CIFAR-10 model (97.65 with RM).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .roi import RoiClassifier


class PyramidBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(
            nn.BatchNorm2d(inplanes),
            nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out),
        )
        self.stride, self.pad = stride, out - inplanes

    def forward(self, x):
        y = self.body(x)
        shortcut = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride != 1 else x
        if self.pad:  # widen the identity with zero channels instead of a projection
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return y + shortcut


class PyramidNet(RoiClassifier):
    def __init__(self, depth: int, alpha: float, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 9  # bottleneck blocks per stage
        add = alpha / (3 * n)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        width, inplanes, blocks = 16.0, 16, []
        for stage in range(3):
            for i in range(n):
                width += add
                planes = int(round(width))
                blocks.append(PyramidBottleneck(inplanes, planes, 2 if (stage > 0 and i == 0) else 1))
                inplanes = planes * PyramidBottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.bn_final = nn.BatchNorm2d(inplanes)
        self.fc = nn.Linear(inplanes, num_classes)
        self.fc_roi = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        x = self.blocks(self.bn1(self.conv1(x)))
        return torch.relu(self.bn_final(x))


def pyramidnet_200_240(num_classes: int = 10) -> PyramidNet:
    return PyramidNet(200, 240, num_classes)


def pyramidnet_164_270(num_classes: int = 10) -> PyramidNet:
    return PyramidNet(164, 270, num_classes)
