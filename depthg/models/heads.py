"""Trainable parts on top of the frozen backbone: segmentation head, probes, 3D-LHP projection.

Shapes: features ``[B,C,h,w]`` -> codes ``[B,Q,h,w]`` (head) -> cluster log-probs / linear logits
``[B,K,h,w]`` (probes). The probes are trained on detached codes; the head (and the LHP projection)
by the correlation losses in ``depthg.losses``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationHead(nn.Module):
    """STEGO head: a 1x1 linear branch plus a (1x1, ReLU, 1x1) nonlinear branch, summed.

    ``forward(feats, feats_nonlinear)`` feeds the nonlinear branch its own input (the reference trains with a
    separate dropout mask per branch); by default both branches read ``feats``.
    """

    def __init__(self, dim: int, code_dim: int):
        super().__init__()
        self.linear = nn.Conv2d(dim, code_dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, code_dim, 1))

    def forward(self, feats: torch.Tensor, feats_nonlinear: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(feats) + self.nonlinear(feats if feats_nonlinear is None else feats_nonlinear)


class ClusterProbe(nn.Module):
    """Cosine cluster probe (learned k-means) with ``n_clusters`` centroids in code space."""

    def __init__(self, code_dim: int, n_clusters: int):
        super().__init__()
        self.n_clusters = int(n_clusters)
        self.centroids = nn.Parameter(torch.randn(n_clusters, code_dim))

    def cosine(self, codes: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every code with every centroid -> ``[B,K,h,w]``."""
        return torch.einsum("bchw,kc->bkhw", F.normalize(codes, dim=1), F.normalize(self.centroids, dim=1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``log_softmax(2 * cos)`` over clusters -> ``[B,K,h,w]``."""
        return F.log_softmax(2.0 * self.cosine(codes), dim=1)

    def loss(self, codes: torch.Tensor) -> torch.Tensor:
        """STEGO's learned k-means: ``-(one_hot(argmax cos) * cos).sum(1).mean()``."""
        cos = self.cosine(codes)
        # one-hot of the argmax by scatter: F.one_hot validates its input's range on the host (a device sync)
        assign = torch.zeros_like(cos).scatter_(1, cos.argmax(dim=1, keepdim=True), 1.0)
        return -(assign * cos).sum(dim=1).mean()

    def predict(self, codes: torch.Tensor) -> torch.Tensor:
        """Hard cluster ids ``[B,h,w]`` (int64)."""
        return self.cosine(codes).argmax(dim=1)


class LinearProbe(nn.Module):
    """A 1x1 conv from codes to class logits, trained with cross-entropy (-1 = ignore)."""

    def __init__(self, code_dim: int, n_classes: int):
        super().__init__()
        self.n_classes = int(n_classes)
        self.conv = nn.Conv2d(code_dim, n_classes, 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.conv(codes)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labelled pixels; 0 (with a graph) when none is labelled.

        ``logits`` ``[B,K,h,w]`` are bilinearly resampled to the label size ``[B,H,W]`` if they differ.
        Negative labels are ignored. No host sync: the mean is a masked sum over a clamped count.
        """
        if logits.shape[2:] != labels.shape[1:]:
            logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
        labels = labels.long()
        valid = labels >= 0
        per_pixel = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


class LHPProjection(nn.Module):
    """3D local-hidden-positive projection: 1x1 conv, ReLU, 1x1 conv in code space.

    ``forward(codes, trainable=False)`` uses detached weights: gradients still reach ``codes`` (the head) but
    never the projection, which then keeps its initial weights under any optimizer (a zero or missing gradient
    gives Adam a zero step): the reference's projection is in no optimizer.
    """

    def __init__(self, code_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(code_dim, code_dim, 1), nn.ReLU(), nn.Conv2d(code_dim, code_dim, 1))

    def forward(self, codes: torch.Tensor, trainable: bool = True) -> torch.Tensor:
        if trainable:
            return self.net(codes)
        first, last = self.net[0], self.net[2]
        hidden = F.relu(F.conv2d(codes, first.weight.detach(), first.bias.detach()))
        return F.conv2d(hidden, last.weight.detach(), last.bias.detach())


class Segmenter(nn.Module):
    """Head + cluster probe (n_classes + extra_clusters) + linear probe + optional LHP projection."""

    def __init__(self, feat_dim: int, code_dim: int, n_classes: int, extra_clusters: int = 0, lhp: bool = False):
        super().__init__()
        if min(feat_dim, code_dim, n_classes) < 1 or extra_clusters < 0:
            raise ValueError(f"Segmenter: feat_dim={feat_dim}, code_dim={code_dim}, n_classes={n_classes} must be "
                             f">= 1 and extra_clusters={extra_clusters} >= 0")
        self.feat_dim, self.code_dim, self.n_classes = int(feat_dim), int(code_dim), int(n_classes)
        self.n_clusters = int(n_classes + extra_clusters)
        self.head = SegmentationHead(feat_dim, code_dim)
        self.cluster_probe = ClusterProbe(code_dim, self.n_clusters)
        self.linear_probe = LinearProbe(code_dim, n_classes)
        self.lhp = LHPProjection(code_dim) if lhp else None

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Codes ``[B,Q,h,w]`` of backbone features ``[B,C,h,w]``."""
        return self.head(feats)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the correlation losses (head, and the LHP projection when present)."""
        params = list(self.head.parameters())
        if self.lhp is not None:
            params += list(self.lhp.parameters())
        return params

    def probe_parameters(self) -> list[nn.Parameter]:
        """Parameters trained on detached codes (cluster and linear probes)."""
        return list(self.cluster_probe.parameters()) + list(self.linear_probe.parameters())

    def describe(self) -> dict:
        """The shape-defining arguments (what a checkpoint needs to rebuild this module)."""
        return {"feat_dim": self.feat_dim, "code_dim": self.code_dim, "n_classes": self.n_classes,
                "extra_clusters": self.n_clusters - self.n_classes, "lhp": self.lhp is not None}


def build_segmenter(model_cfg, feat_dim: int, lhp_enabled: bool = False) -> Segmenter:
    """A ``Segmenter`` from ``ModelConfig`` (code_dim, n_classes, extra_clusters) and the backbone dim."""
    return Segmenter(feat_dim, model_cfg.code_dim, model_cfg.n_classes, model_cfg.extra_clusters, lhp_enabled)
