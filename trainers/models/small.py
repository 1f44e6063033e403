"""A small CNN for 32x32 inputs, fast enough for the CPU demo (a few seconds per epoch on digits)."""

from __future__ import annotations

import torch.nn as nn

from .roi import RoiClassifier


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallNet(RoiClassifier):
    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            _block(3, width), nn.MaxPool2d(2),               # 16x16
            _block(width, 2 * width), nn.MaxPool2d(2),       # 8x8
            _block(2 * width, 4 * width), _block(4 * width, 4 * width),
        )
        self.fc = nn.Linear(4 * width, num_classes)
        self.fc_roi = nn.Linear(4 * width, num_classes)

    def features(self, x):
        return self.body(x)


def small_cnn(num_classes: int = 10) -> SmallNet:
    return SmallNet(num_classes)
