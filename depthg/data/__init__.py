"""Data: dataset readers, synthetic street scenes, crops and resizes.

    src = build_source(cfg.data, "train", n_classes=cfg.model.n_classes)
    rec = src.load(src.ids()[0])          # Record(id, image uint8 HxWx3, depth|None, label|None)
    crops = five_crop(rec, cfg.data.crop_ratio)
"""
from depthg.data.base import ZOEDEPTH_NYU_MAX, Record, Source, SourceError, clip_minmax, minmax
from depthg.data.sources import (CamVidSource, CityscapesSource, CocoStuff27Source, FolderSource,
                                 PotsdamSource, build_source, read_depth, read_image)
from depthg.data.synthetic import SyntheticSource, render_scene
from depthg.data.transforms import crop_boxes, five_crop, resize_center_crop, to_tensor_image, transform_record

__all__ = [
    "Record", "Source", "SourceError", "minmax", "clip_minmax", "ZOEDEPTH_NYU_MAX", "build_source", "read_image",
    "read_depth",
    "FolderSource", "CamVidSource", "CocoStuff27Source", "CityscapesSource", "PotsdamSource",
    "SyntheticSource", "render_scene", "five_crop", "crop_boxes", "resize_center_crop", "transform_record", "to_tensor_image",
]
