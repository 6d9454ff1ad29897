"""One DepthG training step as a pure function of (models, batch, config, batch index, generator).

``compute_losses`` runs, in order (METHOD.md sections 2-6):

1. the frozen backbone on anchor and positive crops in one forward (no grad; bf16 autocast on CUDA);
2. Dropout2d on the features (``model.dropout``, training only) with masks drawn from ``generator``;
3. depth-guided sampling of S x S locations per crop on the device (``sampling.sample_locations``),
   S from ``schedules.fps_samples_from(cfg.sampling, batch_idx)``;
4. the head, the STEGO correlation losses (self, kNN, negatives) and the DepthG depth loss with
   (lambda, b) from ``schedules.depth_schedule_from(cfg.loss.depth, batch_idx)`` (mode ``none``
   skips it), plus optional 3D-LHP (the same losses on ``lhp(lhp_mix(codes, points))``, weight 0.2);
5. the cluster and linear probes on *detached* codes (labels -1 are ignored).

It returns every named term plus ``head`` (the head objective), ``probes`` (cluster + linear) and
``total = head + probes``: the probes only see detached codes, so one backward of ``total`` trains
each part with its own loss. ``lambda``, ``b_depth`` and ``S`` report the schedule values. All
randomness (dropout masks, random sampling, negative permutations) comes from ``generator``.
"""
from __future__ import annotations

import contextlib

import torch

from depthg import losses, sampling, schedules


def dropout2d(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Channel dropout like ``F.dropout2d`` but with masks from ``generator`` (no global RNG)."""
    if p <= 0.0:
        return x
    keep = torch.rand(x.shape[0], x.shape[1], 1, 1, generator=generator,
                      device=generator.device if generator is not None else x.device) >= p
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)


def backbone_features(backbone, images: torch.Tensor) -> torch.Tensor:
    """Frozen features [B,C,h,w] in fp32; bf16 autocast on CUDA."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        feats = backbone(images)
    return feats.float()


def _to(batch: dict, key: str, device) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"training batch lacks '{key}' (expected image, depth, label, pos_image, pos_depth)")
    return batch[key].to(device, non_blocking=True)


def _correlation(cfg, feats, feats_pos, codes, codes_pos, loc, loc_pos, weight, shift, generator) -> dict:
    """STEGO terms + depth term for one set of codes; ``loss`` = stego + lambda * depth.

    The depth term pairs the anchor crop with itself (crops of the same image, METHOD.md section 3),
    at the anchor's sampled locations.
    """
    lc = cfg.loss
    terms = losses.stego_losses(feats, feats_pos, codes, codes_pos, loc.coords, loc_pos.coords, lc,
                                generator=generator)
    loss = terms["stego"]
    if lc.depth.mode != "none":
        sampled = losses.sample_features(codes, loc.coords)
        dterms = losses.depth_correlation_loss(lc.depth.mode, sampled, sampled, loc.depth, loc.depth,
                                               loc.points, loc.points, shift, lc.zero_clamp)
        terms.update(dterms)
        loss = loss + weight * dterms["depth"]
    terms["loss"] = loss
    return terms


def _grid_points(cfg, depth: torch.Tensor, grid_hw) -> torch.Tensor:
    """3D points of every feature-grid patch [B,h*w,3] (the FPS camera), for 3D-LHP."""
    pooled = sampling.pool_depth(depth, grid_hw)
    return sampling.lift_points(pooled, cfg.sampling.fov_deg, reference=cfg.sampling.mode == "fps_reference")


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
    depth, pos_depth = _to(batch, "depth", device), _to(batch, "pos_depth", device)
    labels = _to(batch, "label", device)
    feats, feats_pos = backbone_features(backbone, torch.cat([image, pos_image])).chunk(2)
    return losses_from_features(segmenter, feats, feats_pos, depth, pos_depth, labels, cfg, batch_idx,
                                generator, training)


def losses_from_features(segmenter, feats: torch.Tensor, feats_pos: torch.Tensor, depth: torch.Tensor,
                         pos_depth: torch.Tensor, labels: torch.Tensor, cfg, batch_idx: int,
                         generator: torch.Generator | None = None, training: bool = True) -> dict:
    """Everything after the frozen backbone: the entry point when features are precomputed (cached)."""
    dtype = next(segmenter.head.parameters()).dtype
    if training:
        feats = dropout2d(feats, cfg.model.dropout, generator)
        feats_pos = dropout2d(feats_pos, cfg.model.dropout, generator)
    codes, codes_pos = segmenter.head(feats.to(dtype)).float(), segmenter.head(feats_pos.to(dtype)).float()

    grid = tuple(feats.shape[-2:])
    samples = schedules.fps_samples_from(cfg.sampling, batch_idx)
    sp = cfg.sampling
    loc = sampling.sample_locations(sp.mode, depth, grid, samples, sp.fov_deg, sp.start, generator)
    loc_pos = sampling.sample_locations(sp.mode, pos_depth, grid, samples, sp.fov_deg, sp.start, generator)
    weight, shift = schedules.depth_schedule_from(cfg.loss.depth, batch_idx)
    if cfg.loss.depth.mode == "none":
        weight = 0.0

    terms = _correlation(cfg, feats, feats_pos, codes, codes_pos, loc, loc_pos, weight, shift, generator)
    head = terms.pop("loss")
    if cfg.loss.lhp.enabled:
        if segmenter.lhp is None:
            raise ValueError("loss.lhp.enabled=true but the segmenter has no LHP projection (build_segmenter lhp_enabled)")
        mixed = losses.lhp_mix(codes, _grid_points(cfg, depth, grid), cfg.loss.lhp.quantile)
        mixed_pos = losses.lhp_mix(codes_pos, _grid_points(cfg, pos_depth, grid), cfg.loss.lhp.quantile)
        proj, proj_pos = segmenter.lhp(mixed.to(dtype)).float(), segmenter.lhp(mixed_pos.to(dtype)).float()
        lterms = _correlation(cfg, feats, feats_pos, proj, proj_pos, loc, loc_pos, weight, shift, generator)
        head = head + cfg.loss.lhp.weight * lterms["loss"]
        terms.update({f"lhp_{k}": v for k, v in lterms.items() if k != "loss"})
        terms["lhp"] = lterms["loss"]

    probes = probe_losses(segmenter, codes, labels)
    out = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}
    out.update({"head": head, **probes, "total": head + probes["probes"],
                "lambda": float(weight), "b_depth": float(shift), "S": int(samples)})
    if not training:
        out["codes"] = codes.detach()
    return out
