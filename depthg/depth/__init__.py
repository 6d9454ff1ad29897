"""Depth estimators: the dataset's own depth or a transformers depth model (see estimators.py)."""
from depthg.depth.estimators import (DatasetDepth, DepthError, TransformersDepth, build_estimator,
                                     is_inverse_depth, normalize_depth)

__all__ = ["DatasetDepth", "DepthError", "TransformersDepth", "build_estimator", "is_inverse_depth",
           "normalize_depth"]
