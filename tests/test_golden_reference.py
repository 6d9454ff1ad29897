"""Golden test: one training step of the reference code, transcribed here, against ``depthg.step`` in reference mode.

The transcription below is written from the reference's behaviour (leonsick/depthg: ``train_segmentation.py``
``training_step``, ``modules.py`` ``ContrastiveCorrelationLoss`` / ``farthest_point_sampling_depth`` /
``depth2points`` / ``DinoFeaturizer``; docs/METHOD.md) in this file's own terms, independently of depthg's
modules: its own FPS loop that deletes chosen candidates, its own coordinate normalisation (k / n * 2 - 1),
its own ``sample`` that permutes the coordinate grid before ``grid_sample``, its own correlation and centring
arithmetic, the depth term on the sign of a regular-grid depth, the three dropout masks and the probes.
Only the random draws (dropout masks, negative permutations) are replayed from the same generator, in the
order ``depthg.step`` documents, since the two sides cannot share an RNG otherwise.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthg.config import load_config
from depthg.losses import permutation_without_fixed_points
from depthg.models.heads import build_segmenter
from depthg.step import losses_from_features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- the reference, transcribed
def ref_schedule(batch: int, lam0=0.19, b0=0.03, every_depth=250, gamma=0.6, s0=11, every_fps=1000,
                 fps_factor=0.9, fps_min=0, optimizers=3):
    """Replay the reference's loop up to ``batch``: the loss of batch k uses the values before its decay test,
    global_step = optimizers * k, depth decay needs global_step > 0, the FPS decay does not (None: off)."""
    lam, b, s = lam0, b0, s0
    for k in range(batch):  # the decay tests that ran after the losses of batches 0 .. batch-1
        step = optimizers * k
        if step % every_depth == 0 and step > 0:
            lam, b = lam * gamma, b * gamma
        if every_fps and step % every_fps == 0:  # every_fps None: fps_sample_decay off
            s = max(int(s * fps_factor), fps_min)
    return lam, b, s


def ref_camera(grid: torch.Tensor) -> torch.Tensor:
    """[h,w] -> [h*w,3]: factor 2*tan(90/2) with the angle in radians; x from columns, y from rows, z = -5d."""
    h, w = grid.shape
    factor = 2.0 * torch.tan(torch.tensor([90.0]) / 2.0)
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    x = factor * grid * (cols - w / 2.0) / w
    y = factor * grid * (rows - h / 2.0) / h
    return torch.stack([x, y, -grid * 5.0]).permute(1, 2, 0).reshape(-1, 3)


def ref_fps(points: np.ndarray, n: int) -> list[int]:
    """Greedy FPS as the reference: start at 0, squared distances, candidates removed once chosen."""
    candidates = list(range(len(points)))
    best = np.full(len(points), np.inf)
    chosen = [candidates.pop(0)]
    while len(chosen) < n:
        d = ((points[chosen[-1]] - points[candidates]) ** 2).sum(-1)
        best[candidates] = np.minimum(d, best[candidates])
        chosen.append(candidates.pop(int(np.argmax(best[candidates]))))
    return chosen


def ref_coords(depth: torch.Tensor, hw, s: int) -> torch.Tensor:
    """The reference's FPS coordinates [B,S,S,2]: (row / h, col / w) * 2 - 1 of the chosen patches, raster order."""
    h, w = hw
    pooled = F.adaptive_avg_pool2d(depth, (h, w))
    out = []
    for img in pooled:
        chosen = ref_fps(ref_camera(img[0]).numpy(), s * s)
        mask = torch.zeros(h * w)
        mask[chosen] = 1.0
        rc = mask.reshape(h, w).nonzero().float()
        rc = torch.stack([rc[:, 0] / h, rc[:, 1] / w], dim=1)
        out.append(rc.reshape(s, s, 2))
    return torch.stack(out) * 2 - 1


def ref_sample(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def ref_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = F.normalize(a, dim=1, eps=1e-10), F.normalize(b, dim=1, eps=1e-10)
    return torch.einsum("nchw,ncij->nhwij", a, b)


def ref_helper(f1, f2, c1, c2, shift, pointwise):
    fd = ref_corr(f1, f2)
    if pointwise:
        old_mean = fd.mean()
        fd = fd - fd.mean([3, 4], keepdim=True)
        fd = fd - fd.mean() + old_mean
    return (-ref_corr(c1, c2).clamp(0.0) * (fd - shift)).mean()


def ref_depth_term(code_sampled, depth, shift):
    s = code_sampled.shape[-1]
    d = F.interpolate(depth, size=(s, s), mode="bilinear", align_corners=True)
    dd = torch.einsum("nchw,ncij->nhwij", F.normalize(d, dim=1), F.normalize(d, dim=1))
    return (-ref_corr(code_sampled, code_sampled).clamp(0.0) * (dd - shift)).mean()


def ref_head(seg, f_linear, f_nonlinear):
    lin, nl = seg.head.linear, seg.head.nonlinear
    hidden = F.relu(F.conv2d(f_nonlinear, nl[0].weight, nl[0].bias))
    return F.conv2d(f_linear, lin.weight, lin.bias) + F.conv2d(hidden, nl[2].weight, nl[2].bias)


def ref_probes(seg, code, label, n_classes):
    code = code.detach()
    logits = F.interpolate(F.conv2d(code, seg.linear_probe.conv.weight, seg.linear_probe.conv.bias),
                           label.shape[-2:], mode="bilinear", align_corners=False)
    flat_logits, flat_label = logits.permute(0, 2, 3, 1).reshape(-1, n_classes), label.reshape(-1)
    keep = (flat_label >= 0) & (flat_label < n_classes)
    linear = F.cross_entropy(flat_logits[keep], flat_label[keep])
    inner = torch.einsum("bchw,nc->bnhw", F.normalize(code, dim=1),
                         F.normalize(seg.cluster_probe.centroids, dim=1))
    hard = F.one_hot(inner.argmax(1), inner.shape[1]).permute(0, 3, 1, 2).float()
    return linear, -(hard * inner).sum(1).mean()


def reference_step(seg, feats, feats_pos, depth, depth_pos, label, masks, perms, batch, p=0.1, n_classes=27,
                   weights=(0.58, 0.07, 0.36, 0.025, 0.70, 0.761)):
    """Loss terms of the reference's training step at ``batch`` (COCO ViT-S/8 recipe, depth as 8-bit levels)."""
    w_self, b_self, w_knn, b_knn, w_neg, b_neg = weights
    lam, b_depth, s = ref_schedule(batch)
    depth, depth_pos = torch.floor(depth * 255), torch.floor(depth_pos * 255)  # 8-bit PNG read as integers
    drop = [[f * m / (1 - p) for m in ms] for f, ms in ((feats, masks[:3]), (feats_pos, masks[3:]))]
    code, code_pos = ref_head(seg, drop[0][0], drop[0][1]), ref_head(seg, drop[1][0], drop[1][1])
    signal, signal_pos = drop[0][2], drop[1][2]
    c1, c2 = ref_coords(depth, feats.shape[-2:], s), ref_coords(depth_pos, feats.shape[-2:], s)
    f1, k1 = ref_sample(signal, c1), ref_sample(code, c1)
    f2, k2 = ref_sample(signal_pos, c2), ref_sample(code_pos, c2)
    intra = ref_helper(f1, f1, k1, k1, b_self, True)
    inter = ref_helper(f1, f2, k1, k2, b_knn, True)
    depth_loss = ref_depth_term(k1, depth, b_depth)
    negs = [ref_helper(f1, ref_sample(signal[perm], c2), k1, ref_sample(code[perm], c2), b_neg, True)
            for perm in perms]
    neg = torch.stack(negs).mean()
    linear, cluster = ref_probes(seg, code, label, n_classes)
    total = w_knn * inter + w_self * intra + w_neg * neg + lam * depth_loss + linear + cluster
    return {"self": intra, "knn": inter, "neg": neg, "depth": depth_loss, "linear_probe": linear,
            "cluster_probe": cluster, "total": total, "lambda": lam, "b_depth": b_depth, "S": s}


# ----------------------------------------------------------------------------- fixtures
def _inputs(seed=0, b=4, c=24, grid=28, size=112):
    g = torch.Generator().manual_seed(seed)
    feats, feats_pos = torch.randn(b, c, grid, grid, generator=g), torch.randn(b, c, grid, grid, generator=g)
    depth = torch.rand(b, 1, size, size, generator=g)
    depth[:, :, : size // 3, : size // 3] = 0.001  # a near region: 8-bit level 0, so the sign depth term sees zeros
    depth_pos = torch.rand(b, 1, size, size, generator=g)
    label = torch.randint(-1, 27, (b, size, size), generator=g)
    return feats, feats_pos, depth, depth_pos, label


def _replayed_draws(seed, b, c, rounds=5):
    """The draws ``depthg.step`` makes, in its documented order: anchor masks (linear, nonlinear, target),
    positive masks (same), no sampling draws in fps_reference mode, then the negative permutations."""
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(b, c, 1, 1, generator=g) >= 0.1).float() for _ in range(6)]
    perms = [permutation_without_fixed_points(b, g) for _ in range(rounds)]
    return masks, perms


@pytest.mark.parametrize("batch", [0, 1, 251])
def test_one_reference_step_equals_the_transcription(batch):
    cfg = load_config(os.path.join(REPO, "configs", "coco_vits8.yaml"), ["model.n_classes=27"])
    assert (cfg.loss.depth.mode, cfg.sampling.mode, cfg.model.dropout_masks, cfg.data.depth_cast) == (
        "reference", "fps_reference", "independent", "uint8")
    feats, feats_pos, depth, depth_pos, label = _inputs()
    torch.manual_seed(0)
    seg = build_segmenter(cfg.model, feats.shape[1])
    out = losses_from_features(seg, feats, feats_pos, depth, depth_pos, label, cfg, batch,
                               torch.Generator().manual_seed(5))
    masks, perms = _replayed_draws(5, feats.shape[0], feats.shape[1])
    with torch.no_grad():
        ref = reference_step(seg, feats, feats_pos, depth, depth_pos, label, masks, perms, batch)
    assert (out["lambda"], out["b_depth"], out["S"]) == pytest.approx((ref["lambda"], ref["b_depth"], ref["S"]))
    for key in ("self", "knn", "neg", "depth", "linear_probe", "cluster_probe", "total"):
        got, want = float(torch.as_tensor(out[key]).detach()), float(torch.as_tensor(ref[key]).detach())
        assert abs(got - want) < 1e-5, (key, got, want)


def test_reference_depth_term_sees_the_zero_depth_levels():
    """Where the 8-bit level is 0 the reference's D is 0, not 1: the depth term differs from the D == 1 shortcut."""
    cfg = load_config(os.path.join(REPO, "configs", "coco_vits8.yaml"), ["model.n_classes=27"])
    feats, feats_pos, depth, depth_pos, label = _inputs(seed=1)
    torch.manual_seed(0)
    seg = build_segmenter(cfg.model, feats.shape[1])
    out = losses_from_features(seg, feats, feats_pos, depth, depth_pos, label, cfg, 0, torch.Generator())
    masks, perms = _replayed_draws(0, feats.shape[0], feats.shape[1])
    with torch.no_grad():
        flat = reference_step(seg, feats, feats_pos, depth.clamp_min(0.5), depth_pos, label, masks, perms, 0)
        assert abs(float(out["depth"]) - float(flat["depth"])) > 1e-4


# ----------------------------------------------------------------------------- schedules
REFERENCE_RUNS = {  # config -> the reference command's schedule arguments (paper_reproduction.sh + defaults)
    "coco_vits8": dict(lam0=0.19, b0=0.03, every_depth=250, gamma=0.6, s0=11, every_fps=1000, fps_factor=0.9),
    "coco_vits8_lhp": dict(lam0=0.19, b0=0.03, every_depth=250, gamma=0.6, s0=11, every_fps=1000, fps_factor=0.9),
    "coco_vitb8": dict(lam0=0.16026274975444096, b0=0.035909146298813595, every_depth=300, gamma=0.64, s0=12,
                       every_fps=1000, fps_factor=1.0),
    "cityscapes_vitb8": dict(lam0=0.09, b0=0.03, every_depth=400, gamma=0.8, s0=11, every_fps=None, fps_factor=0.9),
    "potsdam_vits8": dict(lam0=0.13, b0=0.14, every_depth=200, gamma=1.0, s0=11, every_fps=None, fps_factor=0.9),
}


def _ref_table(batches, **kw):
    rows = [ref_schedule(b, **kw) for b in batches]
    return {"batches": list(batches), "lambda": [r[0] for r in rows], "b_depth": [r[1] for r in rows],
            "samples": [r[2] for r in rows]}


@pytest.mark.parametrize("name", sorted(REFERENCE_RUNS))
def test_print_schedule_equals_the_reference_counting(name, capsys):
    import json

    from launch import train as launch_train

    printed = launch_train.main(["--config", os.path.join(REPO, "configs", f"{name}.yaml"), "--print-schedule"])
    assert json.loads(capsys.readouterr().out) == printed  # one JSON line, no shards needed
    expected = _ref_table(printed["batches"], **REFERENCE_RUNS[name])
    assert printed["batches"] == [0, 1, 249, 250, 251, 999, 1000, 1001, 2000, 2001, 2333]
    assert printed["samples"] == expected["samples"]
    assert printed["lambda"] == pytest.approx(expected["lambda"], rel=1e-12)
    assert printed["b_depth"] == pytest.approx(expected["b_depth"], rel=1e-12)
    every = list(range(0, 2334, 7)) + [2333]
    full = launch_train.main(["--config", os.path.join(REPO, "configs", f"{name}.yaml"),
                              "--print-schedule-at", ",".join(map(str, every))])
    capsys.readouterr()
    assert full["samples"] == _ref_table(every, **REFERENCE_RUNS[name])["samples"]
    assert full["lambda"] == pytest.approx(_ref_table(every, **REFERENCE_RUNS[name])["lambda"], rel=1e-12)


def test_coco_vits8_schedule_values_named_in_the_issue():
    from depthg import schedules

    cfg = load_config(os.path.join(REPO, "configs", "coco_vits8.yaml"))
    t = schedules.table(cfg)
    assert t["samples"] == [11, 9, 9, 9, 9, 9, 9, 8, 8, 7, 7]
    assert t["lambda"][:5] == pytest.approx([0.19, 0.19, 0.19, 0.19, 0.19 * 0.6])
    mean_lambda = sum(schedules.values_at(cfg, k)[0] for k in range(2334)) / 2334
    assert mean_lambda == pytest.approx(sum(ref_schedule(k)[0] for k in range(2334)) / 2334, rel=1e-12)
    assert 0.050 < mean_lambda < 0.051  # 0.0171 with the old every-84-batches conversion
