"""The pure training step: composition of the loss terms, schedules, detached probes, determinism."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from depthg import losses, sampling, schedules
from depthg.config import Config, ConfigError, load_config
from depthg.models.backbones import build_backbone
from depthg.models.heads import build_segmenter
from depthg.step import cast_depth, compute_losses, dropout2d, losses_from_features, stego_options


def _cfg(*overrides):
    return load_config(None, ["model.backbone=tiny_vit", "model.code_dim=6", "model.n_classes=3",
                              "sampling.samples=3", "sampling.min_samples=2", "sampling.decay_every=2",
                              "loss.depth.decay_every=2", "loss.neg_rounds=2", *overrides])


def _batch(b=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    depth = torch.rand(b, 1, size, size, generator=g)
    label = torch.randint(-1, 3, (b, size, size), generator=g)
    return {"image": torch.rand(b, 3, size, size, generator=g), "depth": depth, "label": label,
            "pos_image": torch.rand(b, 3, size, size, generator=g), "pos_depth": torch.rand(b, 1, size, size, generator=g)}


def _models(cfg):
    backbone = build_backbone("tiny_vit")
    torch.manual_seed(0)
    return backbone, build_segmenter(cfg.model, backbone.dim, cfg.loss.lhp.enabled)


def test_terms_compose_and_match_the_library_functions():
    cfg = _cfg()
    backbone, seg = _models(cfg)
    batch = _batch()
    out = compute_losses(backbone, seg, batch, cfg, batch_idx=5, generator=torch.Generator().manual_seed(1))
    for key in ("self", "knn", "neg", "stego", "depth", "cluster_probe", "linear_probe", "probes", "head", "total"):
        assert torch.isfinite(out[key]), key
    lam, b, s = schedules.values_at(cfg, 5)
    assert (out["lambda"], out["b_depth"], out["S"]) == (lam, b, s)
    assert out["S"] == 2 and out["lambda"] == pytest.approx(0.19 * 0.6 ** 2)
    torch.testing.assert_close(out["head"], out["stego"] + lam * out["depth"])
    torch.testing.assert_close(out["total"], out["head"] + out["cluster_probe"] + out["linear_probe"])

    # recompute the head loss independently (training=False: no dropout) from the library pieces
    gen = torch.Generator().manual_seed(7)
    ev = compute_losses(backbone, seg, batch, cfg, 5, generator=gen, training=False)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        f, fp = backbone(batch["image"]), backbone(batch["pos_image"])
        c, cp = seg.head(f), seg.head(fp)
        loc = sampling.sample_locations("fps", batch["depth"], f.shape[-2:], 2, 90.0, "first", gen)
        locp = sampling.sample_locations("fps", batch["pos_depth"], f.shape[-2:], 2, 90.0, "first", gen)
        st = losses.stego_losses(f, fp, c, cp, loc.coords, locp.coords, generator=gen, **stego_options(cfg.loss))
        sc = losses.sample_features(c, loc.coords)
        d = losses.depth_correlation_loss("paper", sc, sc, loc.depth, loc.depth, loc.points, loc.points, b)["depth"]
    torch.testing.assert_close(ev["head"], st["stego"] + lam * d, rtol=1e-4, atol=1e-6)


def test_probes_see_detached_codes_and_one_backward_trains_all():
    cfg = _cfg()
    backbone, seg = _models(cfg)
    out = compute_losses(backbone, seg, _batch(), cfg, 0, torch.Generator().manual_seed(0))
    # the probe loss alone gives no gradient to the head
    grads = torch.autograd.grad(out["probes"], list(seg.head.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    out["total"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in seg.head_parameters())
    assert all(p.grad is not None for p in seg.probe_parameters())
    assert not any(p.grad is not None for p in backbone.parameters())


def test_depth_mode_none_skips_the_term_and_lhp_trains_projection():
    cfg = _cfg("loss.depth.mode=none")
    backbone, seg = _models(cfg)
    out = compute_losses(backbone, seg, _batch(), cfg, 0, torch.Generator().manual_seed(0))
    assert "depth" not in out and out["lambda"] == 0.0
    torch.testing.assert_close(out["head"], out["stego"])

    cfg = _cfg("loss.lhp.enabled=true")
    backbone, seg = _models(cfg)
    out = compute_losses(backbone, seg, _batch(), cfg, 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["lhp"])
    base = out["stego"] + out["lambda"] * out["depth"]
    torch.testing.assert_close(out["head"].detach(), base + 0.2 * out["lhp"])
    out["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.lhp.parameters())


def test_same_generator_state_gives_same_losses():
    cfg = _cfg("sampling.mode=random")
    backbone, seg = _models(cfg)
    batch = _batch()
    a = compute_losses(backbone, seg, batch, cfg, 3, torch.Generator().manual_seed(11))
    b = compute_losses(backbone, seg, batch, cfg, 3, torch.Generator().manual_seed(11))
    c = compute_losses(backbone, seg, batch, cfg, 3, torch.Generator().manual_seed(12))
    assert torch.equal(a["total"], b["total"]) and not torch.equal(a["total"], c["total"])


def test_dropout2d_drops_whole_channels_at_rate_p():
    x = torch.ones(64, 50, 2, 2)
    y = dropout2d(x, 0.25, torch.Generator().manual_seed(0))
    per_channel = y.flatten(2)
    assert ((per_channel == 0).all(-1) | (per_channel == 1 / 0.75).all(-1)).all()
    assert abs(float((per_channel[..., 0] == 0).float().mean()) - 0.25) < 0.03
    assert torch.equal(dropout2d(x, 0.0, None), x)


def test_missing_batch_key_is_named():
    cfg = _cfg()
    backbone, seg = _models(cfg)
    batch = _batch()
    del batch["pos_depth"]  # depth is optional (depthgen.source=none), but these settings read it
    with pytest.raises(ConfigError, match="no pos_depth.*sampling.mode"):
        compute_losses(backbone, seg, batch, cfg, 0, None)


def test_independent_dropout_masks_feed_each_branch_its_own_mask():
    """model.dropout_masks=independent: linear branch, nonlinear branch and correlation target each get a mask."""
    cfg = _cfg("model.dropout=0.5", "model.dropout_masks=independent", "loss.depth.mode=none", "sampling.mode=fps")
    _, seg = _models(cfg)
    g = torch.Generator().manual_seed(0)
    feats, feats_pos = torch.randn(3, 32, 4, 4, generator=g), torch.randn(3, 32, 4, 4, generator=g)
    depth, labels = torch.rand(3, 1, 32, 32, generator=g), torch.zeros(3, 32, 32, dtype=torch.long)
    out = losses_from_features(seg, feats, feats_pos, depth, depth, labels, cfg, 0, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    (lin, nonlin, target), (lin_p, nonlin_p, target_p) = [[dropout2d(f, 0.5, replay) for _ in range(3)]
                                                          for f in (feats, feats_pos)]
    assert not torch.equal(lin, nonlin) and not torch.equal(lin, target)
    with torch.no_grad():
        codes, codes_pos = seg.head(lin, nonlin), seg.head(lin_p, nonlin_p)
        loc = sampling.sample_locations("fps", depth, (4, 4), 3)
        st = losses.stego_losses(target, target_p, codes, codes_pos, loc.coords, loc.coords, generator=replay,
                                 **stego_options(cfg.loss))
    for key in ("self", "knn", "neg"):
        torch.testing.assert_close(out[key], st[key])
    shared_cfg = _cfg("model.dropout=0.5", "loss.depth.mode=none")
    shared = losses_from_features(seg, feats, feats_pos, depth, depth, labels, shared_cfg, 0,
                                  torch.Generator().manual_seed(3))
    assert not torch.equal(shared["self"], out["self"])


def test_reference_lhp_mixes_the_anchor_only_and_never_trains_the_projection():
    cfg = _cfg("loss.lhp.enabled=true", "loss.lhp.mode=reference")
    backbone, seg = _models(cfg)
    before = [p.detach().clone() for p in seg.lhp.parameters()]
    opt = torch.optim.Adam(seg.head_parameters(), lr=1e-2)
    out = compute_losses(backbone, seg, _batch(), cfg, 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["head"].detach(), out["stego"] + out["lambda"] * out["depth"] + 0.2 * out["lhp"])
    out["total"].backward()
    assert all(p.grad is None for p in seg.lhp.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.head.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, seg.lhp.parameters()))


def test_depth_casts_reproduce_the_reference_loaders():
    depth = torch.tensor([[[[0.0, 0.003, 0.5], [0.9999, 1.0, 0.25]]]])
    assert cast_depth(depth, "none") is depth
    assert cast_depth(depth, "uint8").flatten().tolist() == [0.0, 0.0, 127.0, 254.0, 255.0, 63.0]
    assert cast_depth(depth, "int").flatten().tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # Potsdam: the cast depth is all zero (rand() never reaches 1.0), so FPS takes patches 0, 1, 2, ... in order
    # (the top rows) and the reference reads them transposed (the leftmost columns)
    flat = cast_depth(torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), "int")
    loc = sampling.sample_locations("fps_reference", flat, (8, 8), 3)
    assert sorted(loc.idx[0].tolist()) == list(range(9))
    # grid_sample's x (the column read) is the chosen row / 8 * 2 - 1: rows 0..1 are read as columns 0..1
    assert sorted(set(loc.coords[..., 0].flatten().tolist())) == [-1.0, -0.75]
