"""SSD loss: SmoothL1 on positives + cross-entropy with 3:1 hard negative mining (SPEC §4).

Per image: ``loc`` = SmoothL1 (beta 1) summed over the 4 offsets of the positive default boxes;
``conf`` = cross-entropy of the positives plus that of the hardest negatives, at most
``3 * num_pos`` of them (ranked by their cross-entropy, positives excluded); image loss =
``(loc + conf) / num_pos``, 0 for an image without positives. The batch loss is the mean over
images, images without positives included.

The whole batch is handled at once: the hardest negatives are found with one descending sort
of the per-box cross-entropy (positives set to 0, as in the reference, so they rank last), and
the top ``k`` of each row are summed with a rank mask. Everything is computed in float32, also
under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SSDLoss(nn.Module):
    """``SSDLoss()(locs, logits, loc_targets, labels) -> scalar``.

    ``locs`` (N, 4, A) predicted offsets; ``logits`` (N, C, A); ``loc_targets`` (N, 4, A) from
    :meth:`ssd300.box_coder.BoxCoder.encode`; ``labels`` (N, A) int64, 0 = background.
    """

    def __init__(self, negatives_per_positive: int = 3) -> None:
        super().__init__()
        self.negatives_per_positive = negatives_per_positive

    def forward(
        self,
        locs: torch.Tensor,
        logits: torch.Tensor,
        loc_targets: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        with torch.autocast(device_type=locs.device.type, enabled=False):
            return self._loss(locs.float(), logits.float(), loc_targets.float(), labels.long())

    def _loss(
        self,
        locs: torch.Tensor,
        logits: torch.Tensor,
        loc_targets: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        positive = labels > 0  # (N, A)
        num_pos = positive.sum(dim=1)  # (N,)

        loc = F.smooth_l1_loss(locs, loc_targets, reduction="none", beta=1.0).sum(dim=1)
        loc = (loc * positive).sum(dim=1)

        ce = F.cross_entropy(logits, labels, reduction="none")  # (N, A)
        negative_ce = ce.masked_fill(positive, 0.0)
        hardest_first = negative_ce.sort(dim=1, descending=True).values
        num_neg = (self.negatives_per_positive * num_pos).clamp(max=labels.shape[1])
        ranks = torch.arange(labels.shape[1], device=labels.device)
        hard_negatives = (hardest_first * (ranks < num_neg[:, None])).sum(dim=1)
        conf = (ce * positive).sum(dim=1) + hard_negatives

        per_image = (loc + conf) / num_pos.clamp(min=1)
        return torch.where(num_pos > 0, per_image, torch.zeros_like(per_image)).mean()
