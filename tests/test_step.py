"""The pure training step: composition of the loss terms, schedules, detached probes, determinism."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from depthg import losses, sampling, schedules
from depthg.config import Config, load_config
from depthg.models.backbones import build_backbone
from depthg.models.heads import build_segmenter
from depthg.step import compute_losses, dropout2d


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
    lam, b = schedules.depth_schedule_from(cfg.loss.depth, 5)
    assert (out["lambda"], out["b_depth"], out["S"]) == (lam, b, schedules.fps_samples_from(cfg.sampling, 5))
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
        st = losses.stego_losses(f, fp, c, cp, loc.coords, locp.coords, cfg.loss, generator=gen)
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
    del batch["pos_depth"]
    with pytest.raises(KeyError, match="pos_depth"):
        compute_losses(backbone, seg, batch, cfg, 0, None)
