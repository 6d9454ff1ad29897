"""Models: frozen backbones (``backbones``), trainable heads and probes (``heads``), weight loading."""
from depthg.models.backbones import BACKBONES, Backbone, build_backbone
from depthg.models.heads import (ClusterProbe, LHPProjection, LinearProbe, SegmentationHead, Segmenter,
                                 build_segmenter)

__all__ = ["BACKBONES", "Backbone", "build_backbone", "SegmentationHead", "ClusterProbe", "LinearProbe",
           "LHPProjection", "Segmenter", "build_segmenter"]
