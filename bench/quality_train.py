"""The quality benchmark's training and evaluation on cached features (``quality_data.FeatureSet``): the
product's procedure with the frozen backbone's features read from a cache instead of recomputed.

Training (``train_variant``): a fresh ``Segmenter``; each batch goes through ``cached_step``, i.e. the trainer's
own step after the backbone (``depthg.step.losses_from_features``: dropout, sampling, schedules, the STEGO and
depth terms with ``loss.shift_mode``, the probes) and one Adam with the trainer's two groups (head ``train.lr``,
probes ``train.probe_lr``); batches drawn without replacement per epoch (every crop once per epoch, as the
trainer's planner), the positive drawn uniformly from each crop's cached top-k neighbours (as the stream draws
from the K positives of its shard sample). ``tests/test_quality_bench.py`` checks that ``cached_step`` and the trainer's
``compute_losses`` on shards give the same losses on the same batch.

Finishing (``finish``): ``train.finish=fit`` refits the probes on the codes of ``train.finish_samples`` train
crops with the product's ``depthg.probes.fit_probes`` and seed (``cluster.finish``).

``objective="supervised"`` is a diagnostic control, not the method: the head is trained through the linear
probe's cross-entropy on *non-detached* codes (the architecture's supervised ceiling).

Evaluation (``evaluate``): codes of the val maps -> ``depthg.evaluation.probe_scores`` (the product's one
codes -> bilinear upsample -> probe path) -> confusion matrices summed over the split -> one Hungarian matching
(cluster probe) / identity (linear probe).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench import quality_data as qd
from depthg import losses, metrics, probes
from depthg.evaluation import fit_kmeans, kmeans_assign, probe_scores, upsample
from depthg.models import build_segmenter
from depthg.models.heads import LinearProbe
from depthg.step import dropout2d, losses_from_features

OBJECTIVES = ("stego", "supervised")
BATCH_SALT, POSITIVE_SALT = 10_000, 1  # the batch order / positive draws of one run: (seed, salt)


def cached_step(seg, data: qd.FeatureSet, idx: torch.Tensor, pos: torch.Tensor, cfg, step: int,
                gen: torch.Generator) -> dict:
    """The trainer's step on cached features: anchors ``idx`` and positives ``pos`` (rows of ``data``)."""
    if data.depth is not None:
        depth, pos_depth = data.depth[idx], data.depth[pos]
    else:  # data without depth (CamVid): the step accepts None only with settings that read no depth
        depth = pos_depth = None
    return losses_from_features(seg, data.feats[idx].float(), data.feats[pos].float(), depth, pos_depth,
                                data.labels[idx], cfg, step, gen, training=True)


def train_variant(cfg, data: qd.FeatureSet, steps: int, batch: int, seed: int, objective: str = "stego"):
    """A fresh segmenter trained for ``steps`` batches on cached features; returns (segmenter, last terms)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    n, k = len(data), data.nn.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seg = build_segmenter(cfg.model, data.feats.shape[1], cfg.loss.lhp.enabled)
    opt = torch.optim.Adam([{"params": seg.head_parameters(), "lr": cfg.train.lr},
                            {"params": seg.probe_parameters(), "lr": cfg.train.probe_lr}])
    gen = torch.Generator().manual_seed(BATCH_SALT + seed)
    order, pos_in_order, terms = torch.randperm(n, generator=gen), 0, {}
    seg.train()
    for step in range(steps):
        if pos_in_order + batch > n:
            order, pos_in_order = torch.randperm(n, generator=gen), 0
        idx = order[pos_in_order:pos_in_order + batch]
        pos_in_order += batch
        pos = data.nn[idx, torch.randint(k, (len(idx),), generator=gen)]
        if objective == "supervised":
            out = _supervised_losses(seg, data.feats[idx].float(), data.labels[idx], cfg, gen)
        else:
            out = cached_step(seg, data, idx, pos, cfg, step, gen)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        terms = {key: float(v.detach()) if torch.is_tensor(v) else float(v) for key, v in out.items()
                 if key in ("self", "knn", "neg", "depth", "head")}
    seg.eval()
    return seg, terms


def finish(seg, data: qd.FeatureSet, cfg, seed: int) -> dict:
    """``train.finish`` as the trainer does it (``cluster.finish``): with ``fit``, the probes refitted on the
    codes of ``train.finish_samples`` train crops spread evenly over the split, with the trainer's seed for
    ``train.seed = seed``."""
    if cfg.train.finish == "none":
        return {}
    from cluster.finish import finish_seed

    rows = torch.linspace(0, len(data) - 1, min(len(data), cfg.train.finish_samples)).round().long().unique()
    sub = qd.FeatureSet(data.feats[rows], data.labels[rows])
    return probes.fit_probes(seg, all_codes(seg, sub), sub.labels, finish_seed(seed))


def _supervised_losses(seg, feats, labels, cfg, gen) -> dict:
    """Control: head + linear probe trained end to end by cross-entropy; cluster probe on detached codes."""
    codes = seg.head(dropout2d(feats, cfg.model.dropout, gen))
    head = seg.linear_probe.loss(seg.linear_probe(codes), labels)
    cluster = seg.cluster_probe.loss(codes.detach())
    return {"head": head, "total": head + cluster}


@torch.no_grad()
def all_codes(seg, data: qd.FeatureSet, chunk: int = 64) -> torch.Tensor:
    """Codes (eval mode: no dropout) of every map of ``data`` -> float32 [N,Q,h,w]."""
    return torch.cat([seg.head(data.feats[i:i + chunk].float()) for i in range(0, len(data), chunk)])


# ----------------------------------------------------------------------------- evaluation
def _brief(s: dict) -> dict:
    return {"accuracy": s["accuracy"], "miou": s["miou"], "iou": s["iou"]}


@torch.no_grad()
def evaluate(seg, val: qd.FeatureSet, n_classes: int, train: qd.FeatureSet | None = None, chunk: int = 8) -> dict:
    """Cluster probe (Hungarian over the split) and linear probe (identity) through ``probe_scores``.

    With ``train``: also ``codes_kmeans``, cosine k-means (n_classes) fitted on ~20k train code vectors, a
    check that the learned cluster probe has converged.
    """
    size = tuple(val.labels.shape[-2:])
    n_clusters = seg.cluster_probe.n_clusters
    confs = {"cluster": np.zeros((n_clusters, n_classes), np.int64),
             "linear": np.zeros((n_classes, n_classes), np.int64), "kmeans": np.zeros((n_classes, n_classes), np.int64)}
    cent = None
    if train is not None:
        vecs = probes.sample_vectors(all_codes(seg, train), max(1, 20_000 // len(train)), torch.Generator().manual_seed(0))
        cent = fit_kmeans(vecs, n_classes, iters=30, seed=0)
    for start in range(0, len(val), chunk):
        codes = seg.head(val.feats[start:start + chunk].float())
        lab = val.labels[start:start + chunk]
        for name, scores in probe_scores(seg, codes, size).items():
            rows = n_clusters if name == "cluster" else n_classes
            confs[name] += metrics.confusion(scores.argmax(dim=1), lab, rows, n_classes)
        if cent is not None:
            confs["kmeans"] += metrics.confusion(kmeans_assign(upsample(codes, size), cent), lab, n_classes, n_classes)
    out = {"unsupervised": _brief(metrics.hungarian_scores(confs["cluster"])),
           "linear": _brief(metrics.identity_scores(confs["linear"]))}
    if cent is not None:
        out["codes_kmeans"] = _brief(metrics.hungarian_scores(confs["kmeans"]))
    return out


@torch.no_grad()
def evaluate_linear(probe: LinearProbe, maps: torch.Tensor, labels: torch.Tensor, n_classes: int,
                    normalise: bool = False, chunk: int = 8) -> dict:
    """Identity-matched scores of a linear probe on val ``maps``: logits on the grid, bilinearly upsampled to
    the label size (the same numbers as upsampling the maps first: a 1x1 conv commutes with the upsample)."""
    conf = np.zeros((n_classes, n_classes), np.int64)
    for start in range(0, maps.shape[0], chunk):
        x = maps[start:start + chunk].float()
        logits = probe(F.normalize(x, dim=1) if normalise else x)
        pred = upsample(logits, tuple(labels.shape[-2:])).argmax(dim=1)
        conf += metrics.confusion(pred, labels[start:start + chunk], n_classes, n_classes)
    return _brief(metrics.identity_scores(conf))


@torch.no_grad()
def code_stats(codes: torch.Tensor, n_vectors: int = 20_000) -> dict:
    """Shape of a code distribution: mean L2 norm, ``mean_cos`` (mean cosine of random pairs of code vectors:
    1 = every code points the same way, a collapse), effective rank (participation ratio of the second-moment
    spectrum of the unit codes: 1 = all on one axis) and the share of its top 3 eigenvalues."""
    vecs = probes.sample_vectors(codes, max(1, n_vectors // codes.shape[0]), torch.Generator().manual_seed(0)).double()
    unit = F.normalize(vecs, dim=1)
    ev = torch.linalg.eigvalsh(unit.T @ unit / unit.shape[0]).clamp(min=0).flip(0)
    perm = torch.randperm(unit.shape[0], generator=torch.Generator().manual_seed(1))
    return {"norm_mean": float(vecs.norm(dim=1).mean()), "mean_cos": float((unit * unit[perm]).sum(dim=1).mean()),
            "eff_rank": float(ev.sum() ** 2 / (ev ** 2).sum()), "top3_share": float(ev[:3].sum() / ev.sum())}


@torch.no_grad()
def kmeans_baseline(train_raw: torch.Tensor, val: qd.FeatureSet, n_classes: int, seed: int, fit_on: str) -> dict:
    """Cosine k-means on raw backbone vectors (of ``train_raw`` or the val maps), Hungarian on val.

    Centroids are fitted on about 20k vectors sampled from the train crops (``fit_on="train"``) or from the
    val images themselves (``"val"``, transductive); val pixels take the argmax of the bilinearly upsampled
    cosine scores.
    """
    gen = torch.Generator().manual_seed(seed)
    source = train_raw if fit_on == "train" else val.feats
    per = max(1, 20_000 // source.shape[0])
    cent = fit_kmeans(probes.sample_vectors(source, per, gen), n_classes, iters=30, seed=seed)
    conf = np.zeros((n_classes, n_classes), np.int64)
    scores = torch.cat([torch.einsum("bchw,kc->bkhw", F.normalize(val.feats[i:i + 8].float(), dim=1), cent)
                        for i in range(0, len(val), 8)])
    for start, up in qd.upsample_chunks(scores, tuple(val.labels.shape[-2:]), chunk=8):
        conf += metrics.confusion(up.argmax(dim=1), val.labels[start:start + up.shape[0]], n_classes, n_classes)
    return {"unsupervised": _brief(metrics.hungarian_scores(conf))}


@torch.no_grad()
def correlation_samples(cfg, data: qd.FeatureSet, batch: int, seed: int, rounds: int = 4) -> dict[str, torch.Tensor]:
    """(Pointwise-centred, as the loss sees them) feature correlations of self, kNN and negative pairs at random
    S x S locations of ``rounds`` random batches of the train split -> {"self", "knn", "neg"}: flat tensors."""
    gen = torch.Generator().manual_seed(seed)
    vals = {"self": [], "knn": [], "neg": []}
    s = cfg.sampling.samples
    for _ in range(rounds):
        idx = torch.randperm(len(data), generator=gen)[:batch]
        pos = data.nn[idx, torch.randint(data.nn.shape[1], (len(idx),), generator=gen)]
        neg = idx[losses.permutation_without_fixed_points(len(idx), gen)]
        coords = [torch.rand(len(idx), s, s, 2, generator=gen) * 2 - 1 for _ in range(2)]
        f1 = losses.sample_features(data.feats[idx].float(), coords[0])
        for name, other in (("self", idx), ("knn", pos), ("neg", neg)):
            f2 = f1 if name == "self" else losses.sample_features(data.feats[other].float(), coords[1])
            corr = losses.correlation(f1, f2)
            if cfg.loss.pointwise:
                corr = corr - corr.mean(dim=(3, 4), keepdim=True) + corr.mean()
            vals[name].append(corr.flatten())
    sub = torch.Generator().manual_seed(seed + 1)
    return {k: (lambda v: v[torch.randperm(v.numel(), generator=sub)[:100_000]])(torch.cat(v)) for k, v in vals.items()}


def correlation_stats(cfg, data: qd.FeatureSet, batch: int, seed: int, rounds: int = 4) -> dict:
    """Mean / quartiles of ``correlation_samples``: the label-free statistic used to set the loss shifts."""
    out = {}
    for name, v in correlation_samples(cfg, data, batch, seed, rounds).items():
        q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75]))
        out[name] = {"mean": float(v.mean()), "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}
    return out


def summarise(runs: list[dict]) -> dict:
    """mean / std (population std over seeds) of accuracy and mIoU for each probe, plus the raw runs."""
    out = {"runs": runs, "seeds": len(runs)}
    for probe in ("unsupervised", "linear", "codes_kmeans", "linear_fresh"):
        if probe not in runs[0]:
            continue
        for metric in ("accuracy", "miou"):
            v = np.array([r[probe][metric] for r in runs], dtype=np.float64)
            out[f"{probe}_{metric}_mean"] = float(v.mean())
            out[f"{probe}_{metric}_std"] = float(v.std())
    return out


paired = metrics.paired_difference  # paired by seed, 95% t interval (shared with cluster.reproduce)
