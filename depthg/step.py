"""One DepthG training step as a pure function of (models, batch, config, batch index, generator).

This is the one module that reads the loss / sampling / model config for training; the loss functions it
calls take explicit arguments. ``compute_losses`` runs, in order (docs/METHOD.md sections 2-7):

1. the frozen backbone on anchor and positive crops in one forward (no grad) in the head's precision: fp32
   with no autocast for an fp32 head (``train.precision=fp32``, the reference's precision), bf16 autocast
   only under a bf16 engine (``backbone_autocast``);
2. ``data.depth_cast``: depth as the reference read it (8-bit integers, or Potsdam's integer cast), if asked;
3. Dropout2d on the features (``model.dropout``, training only) and the head: ``model.dropout_masks=shared``
   drops each image's features once for the head and the correlation target; ``independent`` draws the
   reference's three masks (linear branch, nonlinear branch, correlation target);
4. S x S sampling locations per crop on the device (``sampling.sample_locations``), and the schedules
   (lambda, b_depth, S) = ``schedules.values_at(cfg, batch_idx)``;
5. the STEGO correlation losses (self, kNN, negatives) and the DepthG depth term (mode ``none`` skips it),
   plus optional 3D-LHP (``loss.lhp``: the same losses on the projected mixed codes, weight 0.2);
6. the cluster and linear probes on *detached* codes (labels -1 are ignored).

It returns every named term plus ``head`` (the head objective), ``probes`` (cluster + linear) and
``total = head + probes``: the probes only see detached codes, so one backward of ``total`` trains
each part with its own loss. ``lambda``, ``b_depth`` and ``S`` report the schedule values. All
randomness comes from ``generator``, drawn in this order: anchor dropout masks, positive dropout masks,
anchor and positive sampling (``random`` mode / random FPS start), negative permutations (then those of
3D-LHP).
"""
from __future__ import annotations

import contextlib

import torch

from depthg import losses, sampling, schedules
from depthg.config import check_depth_free


def dropout2d(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Channel dropout like ``F.dropout2d`` but with masks from ``generator`` (no global RNG)."""
    if p <= 0.0:
        return x
    keep = torch.rand(x.shape[0], x.shape[1], 1, 1, generator=generator,
                      device=generator.device if generator is not None else x.device) >= p
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)


def cast_depth(depth: torch.Tensor, how: str) -> torch.Tensor:
    """Depth [0, 1] as the reference's loaders handed it to the loss (``data.depth_cast``).

    ``none``: unchanged. ``uint8``: the 8-bit PNG the reference wrote (``(d * 255)`` truncated) read as
    integers 0..255. ``int``: the reference's Potsdam loader, that PNG scaled back to [0, 1] and cast to
    integers: 1 only at the farthest 8-bit level, 0 everywhere else.
    """
    if how == "none":
        return depth
    levels = torch.floor(depth * 255.0)
    if how == "uint8":
        return levels
    if how == "int":
        return torch.floor(levels / 255.0)
    raise ValueError(f"data.depth_cast: {how!r} is not one of none, uint8, int")


def stego_options(loss_cfg) -> dict:
    """The keyword arguments of ``losses.stego_losses`` from ``cfg.loss``."""
    keys = ("self_weight", "self_shift", "knn_weight", "knn_shift", "neg_weight", "neg_shift", "pointwise",
            "zero_clamp", "neg_rounds", "shift_mode")
    return {key: getattr(loss_cfg, key) for key in keys}


def backbone_autocast(compute_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of the frozen backbone for a head computing in ``compute_dtype``, on any device: None
    (no autocast, fp32 throughout) for fp32; bf16 only when the head itself is bf16 (an explicit
    ``train.precision=bf16`` / ``auto`` on CUDA: a speed setting, docs/METHOD.md)."""
    return None if compute_dtype == torch.float32 else compute_dtype


def backbone_features(backbone, images: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frozen features [B,C,h,w] in fp32. ``compute_dtype``: the head's dtype; the backbone runs under autocast
    to it only when it is not fp32 (``backbone_autocast``), else fully in fp32. ``images``: float [B,3,H,W] in
    [0, 1], or the loader's uint8 [B,3,H,W], made float here, on the device the images were moved to (THE one
    place where batches' images become float: a quarter of the bytes cross the host-to-device copy)."""
    if images.dtype == torch.uint8:  # (channels-last strides from the loader's collate: made contiguous here)
        images = images.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    amp = backbone_autocast(compute_dtype)
    autocast = torch.autocast(images.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        feats = backbone(images)
    return feats.float()


def _to(batch: dict, key: str, device) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"training batch lacks '{key}' (expected image, depth, label, pos_image, pos_depth)")
    return batch[key].to(device, non_blocking=True)


def _optional(batch: dict, key: str, device) -> torch.Tensor | None:
    """Depth maps, absent in shards written without depth (``depthgen.source=none``)."""
    return batch[key].to(device, non_blocking=True) if key in batch else None


def _correlation(cfg, target, target_pos, codes, codes_pos, loc, loc_pos, depth, lam, shift, samples,
                 generator) -> dict:
    """STEGO terms + depth term for one set of codes; ``loss`` = stego + lambda * depth.

    The depth term pairs the anchor crop with itself (crops of the same image, docs/METHOD.md section 3), at the
    anchor's sampled locations (``reference``: at a regular S x S grid of ``depth``, as the public code).
    """
    lc = cfg.loss
    terms = losses.stego_losses(target, target_pos, codes, codes_pos, loc.coords, loc_pos.coords,
                                generator=generator, **stego_options(lc))
    loss = terms["stego"]
    if lc.depth.mode != "none":
        sampled = losses.sample_features(codes, loc.coords)
        if lc.depth.mode == "reference":
            grid = losses.reference_depth_grid(depth, samples)
            dterms = losses.depth_correlation_loss("reference", sampled, sampled, grid, grid, None, None, shift,
                                                   lc.zero_clamp)
        else:
            dterms = losses.depth_correlation_loss(lc.depth.mode, sampled, sampled, loc.depth, loc.depth,
                                                   loc.points, loc.points, shift, lc.zero_clamp)
        terms.update(dterms)
        loss = loss + lam * dterms["depth"]
    terms["loss"] = loss
    return terms


def _grid_points(depth: torch.Tensor, grid_hw, fov_deg: float, reference: bool) -> torch.Tensor:
    """3D points of every feature-grid patch [B,h*w,3] (the FPS camera), for 3D-LHP."""
    return sampling.lift_points(sampling.pool_depth(depth, grid_hw), fov_deg, reference=reference)


def _features_and_codes(segmenter, feats, model_cfg, generator, training: bool, dtype):
    """(correlation target, codes) of one set of crops, with the dropout of ``model.dropout_masks``."""
    p = model_cfg.dropout if training else 0.0
    if p <= 0.0 or model_cfg.dropout_masks == "shared":
        target = dropout2d(feats, p, generator)
        return target, segmenter.head(target.to(dtype)).float()
    linear, nonlinear = dropout2d(feats, p, generator), dropout2d(feats, p, generator)
    target = dropout2d(feats, p, generator)
    return target, segmenter.head(linear.to(dtype), nonlinear.to(dtype)).float()


def _lhp_codes(segmenter, cfg, codes, codes_pos, depth, pos_depth, grid, dtype):
    """Projected mixed codes of anchor and positive (``loss.lhp.mode``, docs/METHOD.md section 6)."""
    lc, fov = cfg.loss.lhp, cfg.sampling.fov_deg
    if segmenter.lhp is None:
        raise ValueError("loss.lhp.enabled=true but the segmenter has no LHP projection (build_segmenter lhp_enabled)")
    if lc.mode == "reference":  # anchor mixed (sum / N, reference camera), positive only projected, P frozen
        mixed = losses.lhp_mix(codes, _grid_points(depth, grid, fov, True), lc.quantile, reference=True)
        return (segmenter.lhp(mixed.to(dtype), trainable=False).float(),
                segmenter.lhp(codes_pos.to(dtype), trainable=False).float())
    mixed = losses.lhp_mix(codes, _grid_points(depth, grid, fov, False), lc.quantile)
    mixed_pos = losses.lhp_mix(codes_pos, _grid_points(pos_depth, grid, fov, False), lc.quantile)
    return segmenter.lhp(mixed.to(dtype)).float(), segmenter.lhp(mixed_pos.to(dtype)).float()


def probe_losses(segmenter, codes: torch.Tensor, labels: torch.Tensor) -> dict:
    """Cluster (learned k-means) and linear (CE, -1 ignored) probe losses on detached codes."""
    codes = codes.detach().to(next(segmenter.cluster_probe.parameters()).dtype)  # bf16 under a bf16 engine
    cluster = segmenter.cluster_probe.loss(codes).float()
    linear = segmenter.linear_probe.loss(segmenter.linear_probe(codes).float(), labels)
    return {"cluster_probe": cluster, "linear_probe": linear, "probes": cluster + linear}


def compute_losses(backbone, segmenter, batch: dict, cfg, batch_idx: int,
                   generator: torch.Generator | None = None, training: bool = True) -> dict:
    """All loss terms of one micro batch (see the module docstring); ``total`` is what to backprop."""
    device = next(segmenter.parameters()).device
    image, pos_image = _to(batch, "image", device), _to(batch, "pos_image", device)
    depth, pos_depth = _optional(batch, "depth", device), _optional(batch, "pos_depth", device)
    labels = _to(batch, "label", device)
    dtype = next(segmenter.head.parameters()).dtype  # the engine's precision (bf16 engine: a bf16 module)
    feats, feats_pos = backbone_features(backbone, torch.cat([image, pos_image]), dtype).chunk(2)
    return losses_from_features(segmenter, feats, feats_pos, depth, pos_depth, labels, cfg, batch_idx,
                                generator, training)


def losses_from_features(segmenter, feats: torch.Tensor, feats_pos: torch.Tensor, depth: torch.Tensor,
                         pos_depth: torch.Tensor, labels: torch.Tensor, cfg, batch_idx: int,
                         generator: torch.Generator | None = None, training: bool = True) -> dict:
    """Everything after the frozen backbone: the entry point when features are precomputed (cached).
    ``depth`` / ``pos_depth`` None: data without depth maps, allowed only with settings that read none."""
    dtype = next(segmenter.head.parameters()).dtype
    if depth is None or pos_depth is None:
        missing = " and ".join(k for k, v in (("depth", depth), ("pos_depth", pos_depth)) if v is None)
        check_depth_free(cfg, f"this batch (no {missing}: shards written with depthgen.source=none?)")
    else:
        depth, pos_depth = cast_depth(depth, cfg.data.depth_cast), cast_depth(pos_depth, cfg.data.depth_cast)
    target, codes = _features_and_codes(segmenter, feats, cfg.model, generator, training, dtype)
    target_pos, codes_pos = _features_and_codes(segmenter, feats_pos, cfg.model, generator, training, dtype)

    grid = tuple(feats.shape[-2:])
    lam, shift, samples = schedules.values_at(cfg, batch_idx)
    sp = cfg.sampling
    loc = sampling.sample_locations(sp.mode, depth, grid, samples, sp.fov_deg, sp.start, generator, like=feats)
    loc_pos = sampling.sample_locations(sp.mode, pos_depth, grid, samples, sp.fov_deg, sp.start, generator,
                                        like=feats)

    args = (loc, loc_pos, depth, lam, shift, samples, generator)
    terms = _correlation(cfg, target, target_pos, codes, codes_pos, *args)
    head = terms.pop("loss")
    if cfg.loss.lhp.enabled:
        proj, proj_pos = _lhp_codes(segmenter, cfg, codes, codes_pos, depth, pos_depth, grid, dtype)
        lterms = _correlation(cfg, target, target_pos, proj, proj_pos, *args)
        head = head + cfg.loss.lhp.weight * lterms["loss"]
        terms.update({f"lhp_{k}": v for k, v in lterms.items() if k != "loss"})
        terms["lhp"] = lterms["loss"]

    probes = probe_losses(segmenter, codes, labels)
    out = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}
    out.update({"head": head, **probes, "total": head + probes["probes"],
                "lambda": float(lam), "b_depth": float(shift), "S": int(samples)})
    if not training:
        out["codes"] = codes.detach()
    return out
