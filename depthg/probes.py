"""Fitting the probes on final codes (``train.finish=fit``): no learning rate, no budget, a converged answer.

The probes trained in the loop follow a moving head with Adam; at short budgets the learned k-means has
dead centroids and the linear probe has not converged (docs/QUALITY_DIAGNOSIS.md), so the metrics measure
the probes' training as much as the codes. ``fit_probes`` replaces both once training is done:

* cluster probe: cosine k-means (``depthg.evaluation.fit_kmeans``: k-means++ then Lloyd) on about
  ``n_vectors`` code vectors sampled from the train codes: no labels, the same procedure as the raw-feature
  k-means baseline, so the two differ only in the representation;
* linear probe: multinomial logistic regression (the probe's cross-entropy + a small L2 penalty) on
  ``per_image`` grid cells of each train map, fitted by full-batch L-BFGS (``fit_linear_probe``).

Everything is seeded and deterministic: every rank that runs it on the same codes gets the same probes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from depthg.evaluation import fit_kmeans
from depthg.models.heads import LinearProbe

LINEAR_SALT = 40_000  # separates the linear probe's cell sampling from the k-means vector sampling


def sample_vectors(maps: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``per_image`` random grid vectors of each map ``[N,C,h,w]`` -> float32 ``[N*per_image, C]``."""
    n, c, h, w = maps.shape
    idx = torch.randint(h * w, (n, per_image), generator=generator)
    return torch.gather(maps.flatten(2), 2, idx[:, None, :].expand(-1, c, -1)).permute(0, 2, 1).reshape(-1, c).float()


def probe_pixels(maps: torch.Tensor, labels: torch.Tensor, per_image: int, generator: torch.Generator):
    """(vectors ``[M,C]`` float32, labels ``[M]``) at ``per_image`` random grid cells of each map; a cell's
    label is the label pixel nearest to its centre; ignored pixels (-1) are dropped."""
    n, c, h, w = maps.shape
    lh, lw = labels.shape[-2:]
    rows = torch.clamp(((torch.arange(h) + 0.5) * lh / h).long(), max=lh - 1)
    cols = torch.clamp(((torch.arange(w) + 0.5) * lw / w).long(), max=lw - 1)
    grid_labels = labels[:, rows][:, :, cols].reshape(n, -1)
    per_image = min(per_image, h * w)
    cell = torch.stack([torch.randperm(h * w, generator=generator)[:per_image] for _ in range(n)])
    x = torch.gather(maps.flatten(2), 2, cell[:, None, :].expand(-1, c, -1)).permute(0, 2, 1).reshape(-1, c)
    y = torch.gather(grid_labels, 1, cell).reshape(-1)
    keep = y >= 0
    return x[keep].float(), y[keep]


def fit_linear_probe(maps: torch.Tensor, labels: torch.Tensor, n_classes: int, seed: int, per_image: int = 256,
                     iters: int = 150, weight_decay: float = 1e-4) -> LinearProbe:
    """A fresh converged ``LinearProbe`` on ``maps`` ``[N,C,h,w]`` (codes or backbone features) and ``labels``
    ``[N,H,W]``: inputs standardised for conditioning (folded back into the weights), full-batch L-BFGS."""
    x, y = probe_pixels(maps, labels, per_image, torch.Generator().manual_seed(LINEAR_SALT + seed))
    if y.numel() == 0:
        raise ValueError("fit_linear_probe: no labelled pixel in the maps' labels (all -1)")
    mean, scale = x.mean(dim=0), x.std(dim=0).nan_to_num(1.0).clamp_min(1e-6)
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

    with torch.enable_grad():
        opt.step(closure)
    probe = LinearProbe(x.shape[1], n_classes)
    with torch.no_grad():
        w = weight / scale
        probe.conv.weight.copy_(w[:, :, None, None])
        probe.conv.bias.copy_(bias - w @ mean)
    return probe.eval()


@torch.no_grad()
def fit_probes(segmenter, codes: torch.Tensor, labels: torch.Tensor | None, seed: int,
               n_vectors: int = 20_000) -> dict:
    """Refit ``segmenter``'s probes in place on ``codes`` ``[N,Q,h,w]`` (eval-mode codes of train crops) and
    their ``labels`` ``[N,H,W]`` (None: the linear probe is left as it is). Returns what was fitted."""
    codes = codes.float().cpu()
    k = segmenter.cluster_probe.n_clusters
    vecs = sample_vectors(codes, max(1, -(-n_vectors // codes.shape[0])), torch.Generator().manual_seed(seed))
    if vecs.shape[0] < k:
        raise ValueError(f"fit_probes: {vecs.shape[0]} code vectors for {k} clusters (more train crops needed)")
    centroids = fit_kmeans(vecs, k, iters=30, seed=seed)
    segmenter.cluster_probe.centroids.copy_(centroids.to(segmenter.cluster_probe.centroids))
    out = {"cluster_vectors": int(vecs.shape[0]), "linear": False}
    if labels is not None and bool((labels >= 0).any()):
        probe = fit_linear_probe(codes, labels.cpu(), segmenter.linear_probe.n_classes, seed)
        segmenter.linear_probe.load_state_dict({k_: v.to(segmenter.linear_probe.conv.weight)
                                                for k_, v in probe.state_dict().items()})
        out["linear"] = True
    return out
