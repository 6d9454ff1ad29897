"""The quality benchmark's training and evaluation procedure on cached features (``quality_data.FeatureSet``).

Training (``train_variant``): a fresh ``Segmenter``, ``depthg.step.losses_from_features`` (the trainer's step
after the frozen backbone) and one Adam with two groups (head ``train.lr``, probes ``train.probe_lr``), batches
drawn without replacement per epoch, the positive drawn uniformly from each crop's cached top-k neighbours.
``objective="supervised"`` is a control, not the method: the head is trained through the linear probe's
cross-entropy on *non-detached* codes (the architecture's supervised ceiling).

Probe finishing (``finish_probes``): extra probe-only steps on the final codes, re-seeding dead cluster
centroids (``reseed_dead_centroids``) during the first half. ``fit_linear_probe`` trains a *fresh* linear probe
on any cached maps (codes or backbone features) with the same loss: the converged, head-independent measure
of how much class information a representation keeps.

Evaluation (``evaluate``): codes of the val maps -> ``depthg.evaluation.probe_scores`` (the product's one
codes -> bilinear upsample -> probe path) -> confusion matrices summed over the split -> one Hungarian matching
(cluster probe) / identity (linear probe).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench import quality_data as qd
from depthg import losses, metrics
from depthg.evaluation import fit_kmeans, kmeans_assign, probe_scores, upsample
from depthg.models import build_segmenter
from depthg.models.heads import LinearProbe
from depthg.step import dropout2d, losses_from_features

OBJECTIVES = ("stego", "supervised")


# ----------------------------------------------------------------------------- training
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
    gen = torch.Generator().manual_seed(10_000 + seed)
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
            if data.depth is not None:
                depth, pos_depth = data.depth[idx], data.depth[pos]
            else:
                depth = pos_depth = torch.zeros(len(idx), 1, *data.feats.shape[-2:])
            out = losses_from_features(seg, data.feats[idx].float(), data.feats[pos].float(), depth, pos_depth,
                                       data.labels[idx], cfg, step, gen, training=True)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        terms = {key: float(v.detach()) if torch.is_tensor(v) else float(v) for key, v in out.items()
                 if key in ("self", "knn", "neg", "depth", "head")}
    seg.eval()
    return seg, terms


def _supervised_losses(seg, feats, labels, cfg, gen) -> dict:
    """Control: head + linear probe trained end to end by cross-entropy; cluster probe on detached codes."""
    codes = seg.head(dropout2d(feats, cfg.model.dropout, gen))
    head = seg.linear_probe.loss(seg.linear_probe(codes), labels)
    cluster = seg.cluster_probe.loss(codes.detach())
    return {"head": head, "total": head + cluster}


@torch.no_grad()
def reseed_dead_centroids(probe, codes: torch.Tensor, gen: torch.Generator) -> int:
    """Move every centroid that wins no code vector of the batch onto a random code vector (k-means practice).

    The learned k-means only moves winning centroids, so a badly initialised one stays dead for good and the
    probe ends with fewer clusters than classes.
    """
    flat = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    wins = torch.bincount(probe.cosine(codes).argmax(dim=1).flatten(), minlength=probe.n_clusters)
    dead = torch.nonzero(wins == 0).flatten()
    if len(dead):
        probe.centroids[dead] = flat[torch.randint(flat.shape[0], (len(dead),), generator=gen)]
    return len(dead)


@torch.no_grad()
def all_codes(seg, data: qd.FeatureSet, chunk: int = 64) -> torch.Tensor:
    """Codes (eval mode: no dropout) of every map of ``data`` -> float32 [N,Q,h,w]."""
    return torch.cat([seg.head(data.feats[i:i + chunk].float()) for i in range(0, len(data), chunk)])


def finish_probes(seg, data: qd.FeatureSet, steps: int, batch: int, lr: float, seed: int, reseed: bool = True) -> None:
    """Extra probe-only Adam steps on the final (frozen, dropout-free) codes of the train crops.

    With ``reseed``, dead cluster centroids are re-seeded during the first half (``reseed_dead_centroids``).
    """
    if steps <= 0:
        return
    codes = all_codes(seg, data)
    opt = torch.optim.Adam(seg.probe_parameters(), lr=lr)
    gen = torch.Generator().manual_seed(20_000 + seed)
    for step in range(steps):
        idx = torch.randint(len(data), (min(batch, len(data)),), generator=gen)
        c = codes[idx]
        if reseed and step < steps // 2:
            reseed_dead_centroids(seg.cluster_probe, c, gen)
        loss = seg.cluster_probe.loss(c) + seg.linear_probe.loss(seg.linear_probe(c), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def fit_probes(seg, data: qd.FeatureSet, seed: int, n_vectors: int = 20_000) -> None:
    """Label-free cluster head + converged linear probe on the final train codes, in place of ``finish_probes``:
    the cluster probe's centroids <- cosine k-means (``fit_kmeans``: k-means++, 30 iterations, no labels) on
    ~``n_vectors`` train code vectors, the very procedure of the raw-feature baseline (``kmeans_baseline``), so the
    two differ only in the representation; the linear probe <- ``fit_linear_probe``.

    (Best-of-5 restarts by k-means inertia was measured and rejected: on synthetic val it gave 25.9 +- 1.3 mIoU
    against 32.7 +- 2.5 for one run, because the lowest-inertia solutions split the large classes.)"""
    codes = all_codes(seg, data)
    vecs = qd.sample_vectors(codes, max(1, n_vectors // len(data)), torch.Generator().manual_seed(seed))
    seg.cluster_probe.centroids.copy_(fit_kmeans(vecs, seg.cluster_probe.n_clusters, iters=30, seed=seed))
    with torch.enable_grad():
        probe = fit_linear_probe(codes, data.labels, seg.linear_probe.n_classes, seed)
    seg.linear_probe.load_state_dict(probe.state_dict())


def probe_pixels(maps: torch.Tensor, labels: torch.Tensor, per_image: int, gen: torch.Generator):
    """(vectors [M,C] float32, labels [M]) at ``per_image`` random grid cells of each map; the label of a cell is
    the label pixel nearest to its centre; ignored pixels (-1) are dropped."""
    n, c, h, w = maps.shape
    lh, lw = labels.shape[-2:]
    rows = torch.clamp(((torch.arange(h) + 0.5) * lh / h).long(), max=lh - 1)
    cols = torch.clamp(((torch.arange(w) + 0.5) * lw / w).long(), max=lw - 1)
    grid_labels = labels[:, rows][:, :, cols].reshape(n, -1)  # [N,h*w]
    cell = torch.stack([torch.randperm(h * w, generator=gen)[:per_image] for _ in range(n)])  # [N,P]
    x = torch.gather(maps.flatten(2), 2, cell[:, None, :].expand(-1, c, -1)).permute(0, 2, 1).reshape(-1, c)
    y = torch.gather(grid_labels, 1, cell).reshape(-1)
    keep = y >= 0
    return x[keep].float(), y[keep]


def fit_linear_probe(maps: torch.Tensor, labels: torch.Tensor, n_classes: int, seed: int, per_image: int = 256,
                     iters: int = 150, weight_decay: float = 1e-4, normalise: bool = False) -> LinearProbe:
    """A fresh ``LinearProbe`` on ``maps`` [N,C,h,w] (codes or features): multinomial logistic regression
    (the probe's cross-entropy + a small L2 penalty) fitted by full-batch L-BFGS on sampled cells
    (``probe_pixels``): a converged probe, so its score measures the maps, not the probe's training.

    ``normalise``: the probe sees L2-normalised vectors (a check that the maps' scale does not limit it).
    """
    x, y = probe_pixels(maps, labels, per_image, torch.Generator().manual_seed(40_000 + seed))
    if normalise:
        x = F.normalize(x, dim=1)
    mean, scale = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)  # standardised for conditioning, folded back below
    z = (x - mean) / scale
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    probe = LinearProbe(x.shape[1], n_classes)
    with torch.no_grad():
        w = weight / scale
        probe.conv.weight.copy_(w[:, :, None, None])
        probe.conv.bias.copy_(bias - w @ mean)
    return probe.eval()


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
        vecs = qd.sample_vectors(all_codes(seg, train), max(1, 20_000 // len(train)), torch.Generator().manual_seed(0))
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
    vecs = qd.sample_vectors(codes, max(1, n_vectors // codes.shape[0]), torch.Generator().manual_seed(0)).double()
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
    cent = fit_kmeans(qd.sample_vectors(source, per, gen), n_classes, iters=30, seed=seed)
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


def quantile_shifts(cfg, data: qd.FeatureSet, quantiles, batch: int = 32, seed: int = 0) -> list[str]:
    """Label-free shifts: ``loss.{self,knn,neg}_shift`` at the given quantiles of their pair type's correlations
    (``quantiles`` = (q_self, q_knn, q_neg)); e.g. (0.75, 0.75, 0.9): only the top quarter of self / kNN pairs
    and the top tenth of negative pairs are pulled together. Returns config overrides."""
    samples = correlation_samples(cfg, data, batch, seed)
    return [f"loss.{name}_shift={float(torch.quantile(samples[name], float(q))):.4f}"
            for name, q in zip(("self", "knn", "neg"), quantiles)]


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


def paired(a: list[float], b: list[float]) -> dict:
    """Paired difference a - b over seeds: mean, std and the two-sided 95% t interval of the mean (None: 1 seed)."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) < 2:
        return {"mean": float(d.mean()), "std": 0.0, "ci95": None, "n": len(d)}  # no interval from one seed
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "n": len(d)}
