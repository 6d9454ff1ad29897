"""depthg.losses against explicit loops and the formulas of docs/METHOD.md (float64)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from depthg.config import LossConfig
from depthg.losses import (correlation, depth_correlation_loss, lhp_mix, permutation_without_fixed_points,
                           reference_depth_grid, reference_effective_shift, sample_features, stego_losses,
                           stego_pair_loss)

D = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _cos(u, v):
    return float((u @ v) / (u.norm() * v.norm()))


def test_correlation_equals_explicit_loops():
    a, b = _rand(2, 5, 3, 3, seed=1), _rand(2, 5, 2, 4, seed=2)
    corr = correlation(a, b)
    assert corr.shape == (2, 3, 3, 2, 4)
    for n in range(2):
        for h in range(3):
            for w in range(3):
                for i in range(2):
                    for j in range(4):
                        assert corr[n, h, w, i, j].item() == pytest.approx(_cos(a[n, :, h, w], b[n, :, i, j]))


def _explicit_pair_loss(f1, f2, c1, c2, shift, pointwise, zero_clamp):
    """mean over all (n, hw, ij) of -clamp(Sc) * (F - shift), with F centred by explicit loops."""
    n, _, s1, s2 = f1.shape
    t1, t2 = f2.shape[2:]
    feat = torch.zeros(n, s1 * s2, t1 * t2, dtype=D)
    code = torch.zeros_like(feat)
    for b in range(n):
        for p in range(s1 * s2):
            for q in range(t1 * t2):
                feat[b, p, q] = _cos(f1[b, :, p // s2, p % s2], f2[b, :, q // t2, q % t2])
                code[b, p, q] = _cos(c1[b, :, p // s2, p % s2], c2[b, :, q // t2, q % t2])
    if pointwise:
        grand = feat.mean()
        centred = feat.clone()
        for b in range(n):
            for p in range(s1 * s2):
                centred[b, p] = feat[b, p] - feat[b, p].mean() + grand
        feat = centred
    low = 0.0 if zero_clamp else -9999.0
    total = 0.0
    for b in range(n):
        for p in range(s1 * s2):
            for q in range(t1 * t2):
                total += -max(code[b, p, q].item(), low) * (feat[b, p, q].item() - shift)
    return total / feat.numel()


@pytest.mark.parametrize("pointwise, zero_clamp", [(True, True), (False, True), (True, False)])
def test_stego_pair_loss_equals_explicit_formula(pointwise, zero_clamp):
    f1, f2 = _rand(2, 6, 3, 3, seed=3), _rand(2, 6, 2, 2, seed=4)
    c1, c2 = _rand(2, 4, 3, 3, seed=5), _rand(2, 4, 2, 2, seed=6)
    loss, extras = stego_pair_loss(f1, f2, c1, c2, 0.2, pointwise=pointwise, zero_clamp=zero_clamp)
    assert loss.item() == pytest.approx(_explicit_pair_loss(f1, f2, c1, c2, 0.2, pointwise, zero_clamp), rel=1e-10)
    assert set(extras) == {"feat_corr", "code_corr", "shift"} and float(extras["shift"]) == pytest.approx(0.2)


@pytest.mark.parametrize("q", [0.5, 0.9])
def test_quantile_shift_is_that_quantile_of_the_centred_correlations(q):
    """loss.shift_mode=quantile: b is the q quantile of the (pointwise-centred) correlations, and the loss is
    the fixed-shift formula at that b; only about (1 - q) of the pairs get a positive target F - b."""
    f1, f2 = _rand(2, 6, 3, 3, seed=3), _rand(2, 6, 3, 3, seed=4)
    c1, c2 = _rand(2, 4, 3, 3, seed=5), _rand(2, 4, 3, 3, seed=6)
    feat = correlation(f1, f2)
    feat = feat - feat.mean(dim=(3, 4), keepdim=True) + feat.mean()
    b = float(torch.quantile(feat.flatten(), q))
    loss, extras = stego_pair_loss(f1, f2, c1, c2, q, quantile=True)
    assert float(extras["shift"]) == pytest.approx(b, abs=1e-7)
    assert loss.item() == pytest.approx(_explicit_pair_loss(f1, f2, c1, c2, b, True, True), rel=1e-6)
    assert float((feat > b).float().mean()) == pytest.approx(1 - q, abs=0.02)


def test_quantile_mode_reads_shifts_as_quantiles_and_refuses_others():
    from depthg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.neg_shift.*quantile"):
        load_config(None, ["loss.shift_mode=quantile", "loss.neg_shift=1.5"])
    with pytest.raises(ValueError, match="shift_mode"):
        stego_losses(*([_rand(2, 4, 3, 3, seed=1)] * 4), torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 2, 2),
                     self_weight=1, self_shift=0, knn_weight=1, knn_shift=0, neg_weight=1, neg_shift=0,
                     shift_mode="adaptive")


def test_stego_pair_loss_feature_side_has_no_gradient():
    f1 = _rand(1, 4, 2, 2, seed=7).requires_grad_()
    c1 = _rand(1, 3, 2, 2, seed=8).requires_grad_()
    loss, _ = stego_pair_loss(f1, f1, c1, c1, 0.1)
    loss.backward()
    assert f1.grad is None and c1.grad is not None and c1.grad.abs().sum() > 0


def test_sample_features_reads_grid_points():
    x = _rand(2, 3, 5, 7, seed=9)
    coords = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0 / 3.0 * 2 - 1, 0.0], [5.0, 0.0]], dtype=D)
    coords = coords.view(1, 2, 2, 2).expand(2, -1, -1, -1)
    out = sample_features(x, coords)
    assert out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out[:, :, 0, 0], x[:, :, 0, 0])
    torch.testing.assert_close(out[:, :, 0, 1], x[:, :, 4, 6])
    torch.testing.assert_close(out[:, :, 1, 0], x[:, :, 2, 2])  # x = col 2 of 7, y = row 2 of 5
    torch.testing.assert_close(out[:, :, 1, 1], x[:, :, 2, 6])  # border padding


def test_derangement_has_no_fixed_points_and_is_reproducible():
    for n in (2, 3, 7, 32):
        for seed in range(20):
            perm = permutation_without_fixed_points(n, torch.Generator().manual_seed(seed))
            assert sorted(perm.tolist()) == list(range(n))
            assert (perm != torch.arange(n)).all()
    a = permutation_without_fixed_points(16, torch.Generator().manual_seed(5))
    b = permutation_without_fixed_points(16, torch.Generator().manual_seed(5))
    c = permutation_without_fixed_points(16, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="at least 2"):
        permutation_without_fixed_points(1, torch.Generator())


def test_stego_losses_terms_and_negatives():
    b, s = 4, 3
    feats, feats_pos = _rand(b, 8, 6, 6, seed=10), _rand(b, 8, 6, 6, seed=11)
    codes, codes_pos = _rand(b, 5, 6, 6, seed=12), _rand(b, 5, 6, 6, seed=13)
    coords = torch.rand(b, s, s, 2, generator=torch.Generator().manual_seed(1), dtype=D) * 2 - 1
    coords_pos = torch.rand(b, s, s, 2, generator=torch.Generator().manual_seed(2), dtype=D) * 2 - 1
    cfg = LossConfig(neg_rounds=3, pointwise=False)
    kw = dict(self_weight=cfg.self_weight, self_shift=cfg.self_shift, knn_weight=2.0, knn_shift=cfg.knn_shift,
              neg_weight=cfg.neg_weight, neg_shift=cfg.neg_shift, pointwise=False, neg_rounds=3)
    terms = stego_losses(feats, feats_pos, codes, codes_pos, coords, coords_pos,
                         generator=torch.Generator().manual_seed(7), **kw)
    f1, c1 = sample_features(feats, coords), sample_features(codes, coords)
    f2, c2 = sample_features(feats_pos, coords_pos), sample_features(codes_pos, coords_pos)
    ref_self = stego_pair_loss(f1, f1, c1, c1, cfg.self_shift, pointwise=False)[0]
    ref_knn = stego_pair_loss(f1, f2, c1, c2, cfg.knn_shift, pointwise=False)[0]
    gen = torch.Generator().manual_seed(7)
    neg = []
    for _ in range(3):
        perm = permutation_without_fixed_points(b, gen)
        neg.append(stego_pair_loss(f1, sample_features(feats[perm], coords_pos), c1,
                                   sample_features(codes[perm], coords_pos), cfg.neg_shift, pointwise=False)[0])
    ref_neg = sum(neg) / 3
    torch.testing.assert_close(terms["self"], ref_self)
    torch.testing.assert_close(terms["knn"], ref_knn)
    torch.testing.assert_close(terms["neg"], ref_neg)
    stego = cfg.self_weight * ref_self + 2.0 * ref_knn + cfg.neg_weight * ref_neg
    torch.testing.assert_close(terms["stego"], stego)
    with pytest.raises(TypeError, match="self_wieght"):  # explicit arguments: a typo cannot pass silently
        stego_losses(feats, feats_pos, codes, codes_pos, coords, coords_pos, **kw, self_wieght=1.0)
    with pytest.raises(TypeError, match="self_weight"):  # no hidden defaults for the weights and shifts
        stego_losses(feats, feats_pos, codes, codes_pos, coords, coords_pos, self_shift=0.1, knn_weight=1,
                     knn_shift=0, neg_weight=1, neg_shift=0)


def _codes_depth_points(b=2, q=4, s=3, seed=20):
    codes = _rand(b, q, s, s, seed=seed)
    depth = torch.rand(b, s * s, generator=torch.Generator().manual_seed(seed), dtype=D)
    points = _rand(b, s * s, 3, seed=seed + 1)
    return codes, depth, points


def test_depth_loss_paper_and_distance_explicit():
    ca, da, pa = _codes_depth_points(seed=20)
    cb, db, pb = _codes_depth_points(seed=30)
    shift = 0.1
    paper = depth_correlation_loss("paper", ca, cb, da, db, pa, pb, shift)["depth"]
    dist = depth_correlation_loss("distance", ca, cb, da, db, pa, pb, shift)["depth"]
    code = correlation(ca, cb).reshape(2, 9, 9)
    tot_p = tot_d = 0.0
    for n in range(2):
        largest = max((pa[n, i] - pb[n, j]).norm().item() for i in range(9) for j in range(9))
        for i in range(9):
            for j in range(9):
                sc = max(code[n, i, j].item(), 0.0)
                tot_p += -(da[n, i].item() * db[n, j].item() - shift) * sc
                tot_d += -((1 - (pa[n, i] - pb[n, j]).norm().item() / largest) - shift) * sc
    assert paper.item() == pytest.approx(tot_p / 162, rel=1e-10)
    assert dist.item() == pytest.approx(tot_d / 162, rel=1e-10)
    with pytest.raises(ValueError, match="loss.depth.mode"):
        depth_correlation_loss("none", ca, cb, da, db, pa, pb, shift)


def test_reference_depth_term_is_self_term_with_lowered_shift():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        f, c = _rand(3, 7, 4, 4, seed=seed), _rand(3, 5, 4, 4, seed=seed + 50)
        w_self, b_self, lam, b_depth = (torch.rand(4, generator=g, dtype=D) * torch.tensor([1, 0.5, 0.3, 0.2], dtype=D)).tolist()
        w_self += 0.1
        self_term = stego_pair_loss(f, f, c, c, b_self)[0]
        positive = torch.rand(3, 16, generator=g, dtype=D) + 0.01  # depth > 0 everywhere: D == 1
        depth = depth_correlation_loss("reference", c, c, positive, positive, None, None, b_depth)["depth"]
        explicit = -(1 - b_depth) * correlation(c, c).clamp(min=0).mean()
        torch.testing.assert_close(depth, explicit)
        b_eff = reference_effective_shift(w_self, b_self, lam, b_depth)
        assert b_eff == pytest.approx(b_self - lam / w_self * (1 - b_depth))
        lowered = stego_pair_loss(f, f, c, c, b_eff)[0]
        torch.testing.assert_close(w_self * self_term + lam * depth, w_self * lowered)


def test_reference_depth_term_is_the_sign_of_the_regular_grid_depth():
    """D[p, q] = sign(d_p) * sign(d_q) with d the depth resampled on a regular S x S grid (zeros give D = 0)."""
    c = _rand(2, 5, 3, 3, seed=60)
    depth = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(61), dtype=D)
    depth[0, :, :6, :6] = 0.0  # a zero region: the grid points (0, 0), (0, 1), (1, 0), (1, 1) read 0
    grid = reference_depth_grid(depth, 3)
    torch.testing.assert_close(grid, F.interpolate(depth, (3, 3), mode="bilinear", align_corners=True).flatten(1))
    shift = 0.2
    loss = depth_correlation_loss("reference", c, None, grid, None, None, None, shift)["depth"]
    code = correlation(c, c).reshape(2, 9, 9)
    total = 0.0
    for n in range(2):
        for p in range(9):
            for q in range(9):
                d = (1.0 if grid[n, p] > 0 else 0.0) * (1.0 if grid[n, q] > 0 else 0.0)
                total += -(d - shift) * max(code[n, p, q].item(), 0.0)
    assert (grid[0] == 0).sum() == 4 and loss.item() == pytest.approx(total / 162, rel=1e-10)


def _lhp_brute(codes, points, quantile):
    b, q, h, w = codes.shape
    n = h * w
    out = torch.zeros(b, q, n, dtype=D)
    flat = codes.reshape(b, q, n)
    for k in range(b):
        for i in range(n):
            d = torch.tensor([math.dist(points[k, i].tolist(), points[k, j].tolist()) for j in range(n)], dtype=D)
            nd = (d - d.min()) / (d.max() - d.min())
            thr = torch.quantile(nd, quantile)
            num, den = torch.zeros(q, dtype=D), 0.0
            for j in range(n):
                if nd[j] <= thr:
                    num += (1 - nd[j]) * flat[k, :, j]
                    den += (1 - nd[j]).item()
            out[k, :, i] = num / den
    return out.reshape(b, q, h, w)


@pytest.mark.parametrize("quantile", [0.01, 0.1, 0.3])
def test_lhp_mix_against_brute_force(quantile):
    codes = _rand(2, 3, 5, 5, seed=40)
    points = _rand(2, 25, 3, seed=41)
    mixed = lhp_mix(codes, points, quantile)
    torch.testing.assert_close(mixed, _lhp_brute(codes, points, quantile))


def _lhp_reference_transcribed(codes, points, quantile):
    """The public code's depth propagation: min-max normalised torch.cdist rows, entries above the row's
    quantile zeroed, weights 1 - distance, then the MEAN over all patches of weight * code (sum / N)."""
    b, q, h, w = codes.shape
    flat = codes.reshape(b, q, h * w).permute(0, 2, 1)
    out = []
    for k in range(b):
        dist = torch.cdist(points[k], points[k], p=2)
        lo, hi = dist.min(dim=1, keepdim=True).values, dist.max(dim=1, keepdim=True).values
        normed = (dist - lo) / (hi - lo)
        weight = 1 - normed
        weight[normed > torch.quantile(normed, quantile, dim=1, keepdim=True)] = 0.0
        out.append((weight.unsqueeze(-1) * flat[k].unsqueeze(0)).mean(dim=1))
    return torch.stack(out).permute(0, 2, 1).reshape(b, q, h, w)


def test_lhp_mix_reference_divides_the_weighted_sum_by_the_patch_count():
    codes = _rand(2, 3, 6, 6, seed=44)
    points = _rand(2, 36, 3, seed=45)
    ref = lhp_mix(codes, points, 0.1, reference=True)
    torch.testing.assert_close(ref, _lhp_reference_transcribed(codes, points, 0.1))
    improved = lhp_mix(codes, points, 0.1)
    assert not torch.allclose(ref, improved) and ref.abs().max() < improved.abs().max() / 3


def test_lhp_mix_tiny_quantile_keeps_own_code_and_has_gradient():
    codes = _rand(1, 4, 3, 3, seed=42).requires_grad_()
    points = _rand(1, 9, 3, seed=43)
    mixed = lhp_mix(codes, points, 0.0)  # only the patch itself is within the 0-quantile
    torch.testing.assert_close(mixed, codes)
    mixed.sum().backward()
    assert codes.grad is not None
    with pytest.raises(ValueError, match="points"):
        lhp_mix(codes, points[:, :4], 0.01)
