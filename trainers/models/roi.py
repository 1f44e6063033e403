"""The ROI head RecursiveMix needs, shared by every model.

Given the boxes where history was pasted (pixel ``(x1, y1, x2, y2)`` in the input frame), the model
also returns ``roi_logits``: ``roi_align`` (1x1 output, aligned=True, spatial scale = feature size /
input size) on the last feature map, through ``fc_roi`` (or ``fc`` with ``share_fc``), as in the seed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torchvision.ops import roi_align


class RoiClassifier(nn.Module):
    """Mixin: subclasses provide ``features(x) -> (N, C, h, w)``, ``fc`` and ``fc_roi``."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, boxes: Optional[torch.Tensor] = None, share_fc: bool = False):
        feat = self.features(x)
        logits = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(feat, 1), 1))
        if boxes is None:
            return logits
        # The ROIs and the pooling are float32 whatever the features' dtype (what autocast does for roi_align
        # anyway): a sample's batch index must be exact, and bfloat16 rounds 257..511 to a neighbour, 511 to 512,
        # past the batch (an illegal memory access on a GPU, or another sample's features pooled in silence).
        index = torch.arange(x.shape[0], device=x.device, dtype=torch.float32)[:, None]
        rois = torch.cat([index, boxes.float()], dim=1)
        pooled = roi_align(feat.float(), rois, output_size=(1, 1), spatial_scale=feat.shape[-1] / x.shape[-1],
                           sampling_ratio=-1, aligned=True).to(feat.dtype)
        head = self.fc if share_fc else self.fc_roi
        return logits, head(torch.flatten(pooled, 1))
