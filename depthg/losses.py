"""STEGO feature-correlation distillation, DepthG's depth-feature correlation and 3D-LHP mixing.

Pure functions of explicit tensors, weights, shifts and a ``torch.Generator`` (docs/METHOD.md sections 2, 3
and 6).
Shapes: feature maps ``[B,C,h,w]``, codes ``[B,Q,h,w]``, sampling coordinates ``[B,S,S,2]`` (from
``depthg.sampling``), sampled maps ``[B,C,S,S]``, correlations ``[B,S,S,S,S]``. Every loss is a *mean*
(the reference's reduction). The probes' losses live on the probe modules (``depthg.models.heads``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from depthg.config import DepthMode, ShiftMode, choices

DEPTH_MODES = tuple(m for m in choices(DepthMode) if m != "none")  # "none" = the step skips the term
NO_CLAMP = -9999.0  # the reference's lower clamp when zero_clamp is off


def sample_features(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Read ``x`` [B,C,h,w] at ``coords`` [B,S,S,2] -> [B,C,S,S] (bilinear, align_corners, border)."""
    return F.grid_sample(x, coords.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (over channels) of every location of ``a`` with every location of ``b``.

    a [B,C,S,S], b [B,C,S',S'] -> [B,S,S,S',S'].
    """
    return torch.einsum("nchw,ncij->nhwij", _unit(a), _unit(b))


def _clamp_min(zero_clamp: bool) -> float:
    return 0.0 if zero_clamp else NO_CLAMP


QUANTILE_LIMIT = 1 << 24  # torch.quantile's input limit; larger correlation tensors are read with a stride


def quantile_shift(feat: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of the correlations ``feat`` (a label-free shift: ``loss.shift_mode=quantile``)."""
    flat = feat.detach().float().flatten()
    step = -(-flat.numel() // QUANTILE_LIMIT)
    return torch.quantile(flat[::step], float(q))


def stego_pair_loss(f1, f2, c1, c2, shift: float, pointwise: bool = True, zero_clamp: bool = True,
                    quantile: bool = False):
    """STEGO's correlation loss for one pair of sampled maps -> (loss, extras).

    F = correlation(f1, f2) without gradient; with ``pointwise`` F <- F - mean over the second image's
    locations + mean(F). loss = mean(-clamp(Sc, min) * (F - b)), Sc = correlation(c1, c2), b = ``shift``,
    or with ``quantile`` b = the ``shift`` quantile of F (only the pairs above it are pulled together).
    ``extras``: detached means of F and Sc and the shift b, for logging.
    """
    with torch.no_grad():
        feat = correlation(f1, f2)
        if pointwise:
            feat = feat - feat.mean(dim=(3, 4), keepdim=True) + feat.mean()
        if quantile:
            shift = quantile_shift(feat, shift)
    code = correlation(c1, c2)
    loss = (-code.clamp(min=_clamp_min(zero_clamp)) * (feat - shift)).mean()
    return loss, {"feat_corr": feat.mean(), "code_corr": code.detach().mean(), "shift": torch.as_tensor(shift)}


def permutation_without_fixed_points(n: int, generator: torch.Generator | None = None,
                                     device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (a derangement), reproducible from ``generator``.

    Built as one random n-cycle (no rejection loop, no host sync): every i is mapped to a uniformly random
    j != i. (The reference's ``super_perm`` shifts fixed points by one, which can map two items to the same
    negative: it is not always a permutation.)
    """
    if n < 2:
        raise ValueError(f"a permutation without fixed points needs at least 2 items (the batch), got {n}")
    gen_device = generator.device if generator is not None else "cpu"
    order = torch.randperm(n, generator=generator, device=gen_device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm.to(device) if device is not None else perm


def stego_losses(feats, feats_pos, codes, codes_pos, coords, coords_pos, *, self_weight: float, self_shift: float,
                 knn_weight: float, knn_shift: float, neg_weight: float, neg_shift: float, pointwise: bool = True,
                 zero_clamp: bool = True, neg_rounds: int = 5, shift_mode: str = "fixed",
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """STEGO's three correlation terms -> {"self", "knn", "neg", "stego"}.

    feats/feats_pos [B,C,h,w] (frozen backbone, after dropout), codes/codes_pos [B,Q,h,w], coords/coords_pos
    [B,S,S,2] for the anchor and its kNN positive. Negatives: for each of ``neg_rounds`` rounds a permutation of
    the batch with no fixed points (from ``generator``), read at the *positive's* coordinates; their losses are
    averaged. "self", "knn", "neg" are unweighted; "stego" = self_weight*self + knn_weight*knn + neg_weight*neg.
    ``shift_mode="quantile"``: each shift is read as a quantile of its pair type's correlations in the batch.
    """
    if shift_mode not in choices(ShiftMode):
        raise ValueError(f"loss.shift_mode: {shift_mode!r} is not one of {', '.join(choices(ShiftMode))}")
    pair = dict(pointwise=pointwise, zero_clamp=zero_clamp, quantile=shift_mode == "quantile")
    f1, c1 = sample_features(feats, coords), sample_features(codes, coords)
    f2, c2 = sample_features(feats_pos, coords_pos), sample_features(codes_pos, coords_pos)
    terms = {"self": stego_pair_loss(f1, f1, c1, c1, self_shift, **pair)[0],
             "knn": stego_pair_loss(f1, f2, c1, c2, knn_shift, **pair)[0]}
    neg = []
    for _ in range(int(neg_rounds)):
        perm = permutation_without_fixed_points(feats.shape[0], generator, feats.device)
        f_neg = sample_features(feats[perm], coords_pos)
        c_neg = sample_features(codes[perm], coords_pos)
        neg.append(stego_pair_loss(f1, f_neg, c1, c_neg, neg_shift, **pair)[0])
    terms["neg"] = torch.stack(neg).mean() if neg else feats.new_zeros(())
    terms["stego"] = self_weight * terms["self"] + knn_weight * terms["knn"] + neg_weight * terms["neg"]
    return terms


def reference_depth_grid(depth: torch.Tensor, samples: int) -> torch.Tensor:
    """The depth the reference's depth term reads: ``depth`` [B,1,H,W] resampled bilinearly (align_corners) on
    a regular ``samples`` x ``samples`` grid -> [B,S*S] row-major, whatever locations the features were read at."""
    grid = F.interpolate(depth, size=(samples, samples), mode="bilinear", align_corners=True)
    return grid.flatten(1)


def depth_correlation_loss(mode: str, codes_sampled_a, codes_sampled_b, depth_a, depth_b, points_a, points_b,
                           shift: float, zero_clamp: bool = True) -> dict[str, torch.Tensor]:
    """DepthG's depth-feature correlation term -> {"depth": loss} (unweighted; multiply by lambda_depth).

    codes_sampled_* [B,Q,S,S] (codes read at the sampled locations), depth_* [B,S*S] and points_* [B,S*S,3]
    at the same locations in the same (row-major S x S) order (``sampling.Locations``).
    - ``paper`` (eqs. 5-7): D[hw,uv] = d_a[hw] * d_b[uv]; L = mean(-(D - shift) * clamp(Sc, 0)).
    - ``distance``: D = 1 - ||p_hw - p_uv|| / (largest such distance of that image pair); same loss form.
    - ``reference``: the public code. depth_a is ``reference_depth_grid`` (a regular S x S grid, not the
      sampled locations); the code L2-normalises that one-channel map over its channel, i.e. takes its sign:
      D[hw,uv] = sign(d_a[hw]) * sign(d_a[uv]), 1 wherever depth is positive, 0 where it is exactly zero.
      Only the self pair (``codes_sampled_a``, ``depth_a``) is used. With positive depth this is
      -(1 - shift) * mean(clamp(S_aa, 0)), the self term with a lowered shift (``reference_effective_shift``).
    Pairs: the paper applies the term to crops of the same image; in our batch that is the anchor with itself,
    so callers pass the anchor's codes/depth/points as both a and b (the self pair) for every mode.
    """
    if mode not in DEPTH_MODES:
        raise ValueError(f"loss.depth.mode: {mode!r} is not one of {', '.join(DEPTH_MODES)}")
    low = _clamp_min(zero_clamp)
    if mode == "reference":
        codes_sampled_b, depth_b = codes_sampled_a, depth_a
    code = correlation(codes_sampled_a, codes_sampled_b)  # [B,S,S,S',S']
    b, s1, s2, t1, t2 = code.shape
    with torch.no_grad():
        if mode == "reference":
            sign_a = F.normalize(depth_a.reshape(b, 1, -1), dim=1)[:, 0]  # one channel: d / max(|d|, 1e-12)
            target = sign_a.reshape(b, -1, 1) * sign_a.reshape(b, 1, -1)
        elif mode == "paper":
            target = depth_a.reshape(b, -1, 1) * depth_b.reshape(b, 1, -1)
        else:
            dist = torch.cdist(points_a.reshape(b, -1, 3), points_b.reshape(b, -1, 3),
                               compute_mode="donot_use_mm_for_euclid_dist")
            largest = dist.flatten(1).amax(dim=1).clamp_min(1e-12).view(b, 1, 1)
            target = 1.0 - dist / largest
        target = target.reshape(b, s1, s2, t1, t2).to(code.dtype)
    return {"depth": (-(target - shift) * code.clamp(min=low)).mean()}


def reference_effective_shift(self_weight: float, self_shift: float, lam: float, depth_shift: float) -> float:
    """The self shift that the reference depth term amounts to: b_self - (lam / w_self) * (1 - b_depth).

    w_self * L_self(b_self) + lam * L_depth_reference(b_depth) == w_self * L_self(b_eff) (docs/METHOD.md
    section 3).
    """
    if self_weight == 0:
        raise ValueError("reference_effective_shift: loss.self_weight is 0, the identity does not apply")
    return self_shift - (lam / self_weight) * (1.0 - depth_shift)


def lhp_mix(codes: torch.Tensor, points: torch.Tensor, quantile: float = 0.01, reference: bool = False) -> torch.Tensor:
    """3D local hidden positives: mix each patch's code with its nearest patches in 3D -> [B,Q,h,w].

    points [B,h*w,3] (row-major, e.g. ``sampling.lift_points``). Per row, 3D distances are min-max normalised
    to [0,1]; neighbours are the entries <= the row's ``quantile`` quantile (linear interpolation, as
    ``torch.quantile``), weighted by 1 - normalised distance (the patch itself is always included, weight 1).
    ``reference=False``: the weighted average of the neighbours' codes (keeps the codes' scale).
    ``reference=True``: the public code's weighted *sum* divided by the number of patches h*w (784 at 28x28),
    which shrinks the mixed codes about a hundredfold.
    """
    b, q, h, w = codes.shape
    n = h * w
    if points.shape != (b, n, 3):
        raise ValueError(f"lhp_mix: points must be [B,h*w,3] = {(b, n, 3)}, got {tuple(points.shape)}")
    with torch.no_grad():
        dist = torch.cdist(points.to(codes.dtype), points.to(codes.dtype),
                           compute_mode="donot_use_mm_for_euclid_dist")  # [B,N,N], exact zero diagonal
        low = dist.amin(dim=2, keepdim=True)
        span = (dist.amax(dim=2, keepdim=True) - low).clamp_min(1e-12)
        normed = (dist - low) / span
        threshold = _row_quantile(normed, quantile)
        weight = torch.where(normed <= threshold, 1.0 - normed, torch.zeros_like(normed))
        weight = weight / (float(n) if reference else weight.sum(dim=2, keepdim=True))
    flat = codes.flatten(2).transpose(1, 2)  # [B,N,Q]
    return torch.bmm(weight, flat).transpose(1, 2).reshape(b, q, h, w)


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=-1, keepdim=True)`` (linear) without its input-size limit."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"loss.lhp.quantile: expected a value in [0, 1], got {q}")
    n = x.shape[-1]
    pos = q * (n - 1)
    lo_k, frac = int(pos), pos - int(pos)
    lo = x.kthvalue(lo_k + 1, dim=-1, keepdim=True).values
    if frac == 0.0:
        return lo
    hi = x.kthvalue(min(lo_k + 2, n), dim=-1, keepdim=True).values
    return lo + (hi - lo) * frac

