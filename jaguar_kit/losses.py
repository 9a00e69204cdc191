"""Re-ID objectives: ArcFace (identity classification with an angular margin) and
batch-hard triplet (metric learning on the PK batch), combined by ReIDCriterion.

Both run in float32 (float64 stays float64) with autocast disabled: under fp16/bf16
autocast the cosine logits lose the precision the margin needs, and libraries that cast
the class weights to the input dtype (pytorch-metric-learning issues 293, 309) train
worse. Written here rather than taken from pytorch-metric-learning for that reason and
to keep the wheel's dependencies to what Kaggle's image ships.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import LossConfig


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given float64 (so gradcheck works)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ArcFaceLoss(nn.Module):
    """Additive angular margin softmax (Deng et al. 2019), without the "easy margin".

    The target logit is ``s*cos(theta + m)`` while ``theta + m <= pi``; beyond that
    ``cos(theta + m)`` would increase again, so the usual fallback
    ``s*(cos(theta) - m*sin(m))`` keeps the target logit monotonic in theta.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale = float(scale)
        self.margin = float(margin)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)  # cos(theta) > th  <=>  theta + m < pi
        self.mm = math.sin(math.pi - margin) * margin

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin applied to each row's target class."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            x = _full_precision(emb)
            w = self.weight.to(x.dtype)
            cos = F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))
            cos_t = cos.gather(1, labels.view(-1, 1))
            sin_t = (1.0 - cos_t * cos_t).clamp(min=1e-12).sqrt()
            phi = cos_t * self.cos_m - sin_t * self.sin_m  # cos(theta + m)
            phi = torch.where(cos_t > self.th, phi, cos_t - self.mm)
            out = cos.scatter(1, labels.view(-1, 1), phi)
            return out * self.scale

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return F.cross_entropy(self.logits(emb, labels), labels)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix; zero distances get zero (not NaN) gradients."""
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return d2.clamp(min=1e-12).sqrt()


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances.

    Per anchor: the farthest same-label sample and the closest other-label sample.
    ``margin > 0``: ``relu(d_ap - d_an + margin)``; ``margin == 0``: soft margin
    ``log(1 + exp(d_ap - d_an))``. Anchors without a positive or without a negative in
    the batch are left out of the mean; with none valid the loss is 0 (still attached
    to the graph so backward and DDP work).
    """

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=emb.device.type, enabled=False):
            x = _full_precision(emb)
            d = pairwise_distances(x)
            same = labels[:, None] == labels[None, :]
            eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            pos = same & ~eye
            neg = ~same
            valid = pos.any(1) & neg.any(1)
            if not bool(valid.any()):
                return x.sum() * 0.0
            d, pos, neg = d[valid], pos[valid], neg[valid]
            d_ap = d.masked_fill(~pos, float("-inf")).amax(1)
            d_an = d.masked_fill(~neg, float("inf")).amin(1)
            diff = d_ap - d_an
            loss = F.softplus(diff) if self.margin == 0 else F.relu(diff + self.margin)
            return loss.mean()


class ReIDCriterion(nn.Module):
    """Weighted ArcFace + batch-hard triplet.

    ``forward(emb, labels) -> (total, {"arcface": ..., "triplet": ...})``; the parts are
    detached float tensors for logging. Both terms are always computed (a zero weight
    still keeps the ArcFace weight in the graph, which DDP requires).
    """

    def __init__(self, loss_cfg: "LossConfig", embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.arcface = ArcFaceLoss(embedding_dim, num_classes, loss_cfg.arcface_scale, loss_cfg.arcface_margin)
        self.triplet = BatchHardTripletLoss(loss_cfg.triplet_margin)
        self.arcface_weight = float(loss_cfg.arcface_weight)
        self.triplet_weight = float(loss_cfg.triplet_weight)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        arc = self.arcface(emb, labels)
        tri = self.triplet(emb, labels)
        total = self.arcface_weight * arc + self.triplet_weight * tri
        return total, {"arcface": arc.detach().float(), "triplet": tri.detach().float()}
