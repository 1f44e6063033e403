"""Soft-target CE and the RecursiveMix ROI consistency loss, on a tiny model with roi_align."""

import pytest
import torch
import torch.nn as nn
from torchvision.ops import roi_align

from rmix import RecursiveMix, roi_consistency_loss, smooth_one_hot, soft_target_cross_entropy


def test_smooth_one_hot_matches_seed_convention():
    t = smooth_one_hot(torch.tensor([2, 0]), 5, 0.1)
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.9, 0.025, 0.025]))
    assert torch.allclose(t.sum(1), torch.ones(2))


def test_soft_target_ce_equals_torch_ce_on_hard_labels():
    logits = torch.randn(7, 5)
    y = torch.randint(0, 5, (7,))
    ref = nn.functional.cross_entropy(logits, y)
    assert torch.allclose(soft_target_cross_entropy(logits, y), ref, atol=1e-6)
    assert torch.allclose(soft_target_cross_entropy(logits, smooth_one_hot(y, 5)), ref, atol=1e-6)


def test_roi_loss_weights_by_pasted_area():
    roi, hist = torch.randn(4, 6), torch.randn(4, 6)
    ce = -(torch.log_softmax(roi, 1) * torch.softmax(hist, 1)).sum(1)
    lam = torch.tensor([1.0, 0.75, 0.5, 0.0])
    got = roi_consistency_loss(roi, hist, lam, omega=0.5)
    assert torch.allclose(got, 0.5 * ((1 - lam) * ce).mean())
    # one box per batch: the seed's omega * (1 - lam) * CE
    lam_b = torch.full((4,), 0.7)
    assert torch.allclose(roi_consistency_loss(roi, hist, lam_b, 0.1), 0.1 * 0.3 * ce.mean())
    assert roi_consistency_loss(roi, hist, torch.ones(4), 0.5).item() == 0.0


class TinyRoiNet(nn.Module):
    def __init__(self, k=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, k)
        self.fc_roi = nn.Linear(8, k)

    def forward(self, x, boxes=None):
        feat = torch.relu(self.conv(x))
        logits = self.fc(feat.mean((2, 3)))
        if boxes is None:
            return logits
        rois = torch.cat([torch.arange(x.shape[0], dtype=boxes.dtype)[:, None], boxes], 1)
        pooled = roi_align(feat, rois, output_size=(1, 1), spatial_scale=feat.shape[-1] / x.shape[-1], aligned=True)
        return logits, self.fc_roi(pooled.flatten(1))


def test_gradient_reaches_roi_head_through_roi_align():
    torch.manual_seed(0)
    model = TinyRoiNet()
    mix = RecursiveMix(alpha=1.0, num_classes=10, seed=0)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    b = mix(x, y)
    mix.record_logits(model(b.images))
    b = mix(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert b.boxes is not None and b.history_logits is not None
    feats = b.images.requires_grad_(True)
    logits, roi_logits = model(feats, b.boxes)
    loss = roi_consistency_loss(roi_logits, b.history_logits, b.lam, omega=0.5)
    assert loss.item() > 0
    loss.backward()
    assert model.fc_roi.weight.grad.abs().sum() > 0
    assert model.conv.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the ROI term does not touch the main head
    # the input gradient is non-zero only around the box (roi_align samples inside it)
    g = feats.grad.abs().sum((0, 1))
    x1, y1, x2, y2 = (int(v) for v in b.boxes[0])
    assert g[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2].sum() == pytest.approx(g.sum().item(), rel=1e-5)
