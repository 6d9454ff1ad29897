"""Probe fitting (train.finish=fit): k-means centroids without labels, a converged linear probe, deterministic."""
from __future__ import annotations

import pytest
import torch

from depthg.config import ModelConfig
from depthg.models import build_segmenter
from depthg.probes import fit_linear_probe, fit_probes, probe_pixels


def _clustered_codes(n=12, q=6, h=4, w=4, classes=3, seed=0):
    """Codes whose every grid cell is its class's direction plus small noise; labels at twice the grid."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.eye(q)[:classes] * 3.0
    grid_labels = torch.randint(classes, (n, h, w), generator=gen)
    codes = directions[grid_labels].permute(0, 3, 1, 2) + 0.1 * torch.randn(n, q, h, w, generator=gen)
    labels = grid_labels.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    labels[0, 0, 0] = -1  # an ignored pixel
    return codes, labels


def test_probe_pixels_reads_the_label_at_each_cell_centre_and_drops_ignored():
    codes, labels = _clustered_codes()
    x, y = probe_pixels(codes, labels, 16, torch.Generator().manual_seed(0))
    assert x.shape == (y.numel(), 6) and y.numel() == 12 * 16 - 0  # cell centres never hit pixel (0, 0)
    assert torch.equal(x.argmax(dim=1), y)  # each cell's code points along its class's axis


def test_fit_probes_recovers_the_clusters_and_classes_and_is_deterministic():
    codes, labels = _clustered_codes()
    segs = [build_segmenter(ModelConfig(code_dim=6, n_classes=3), 8, False) for _ in range(2)]
    for seg in segs:
        out = fit_probes(seg, codes, labels, seed=3, n_vectors=200)
        assert out["linear"] and out["cluster_vectors"] >= 200
    for probe in ("cluster_probe", "linear_probe"):  # the heads' random inits differ; the fitted probes do not
        for a, b in zip(getattr(segs[0], probe).state_dict().values(), getattr(segs[1], probe).state_dict().values()):
            assert torch.equal(a, b)
    seg = segs[0]
    clusters = seg.cluster_probe.predict(codes)
    grid_labels = labels[:, ::2, ::2].clone()
    grid_labels[0, 0, 0] = codes[0, :, 0, 0].argmax()
    # one centroid per class: the clusters are the classes up to a permutation
    mapping = {int(c): int(grid_labels[clusters == c].mode().values) for c in clusters.unique()}
    assert sorted(mapping.values()) == [0, 1, 2]
    assert torch.equal(torch.tensor([mapping[int(c)] for c in clusters.flatten()]).view_as(clusters), grid_labels)
    assert torch.equal(seg.linear_probe(codes).argmax(dim=1), grid_labels)


def test_fit_probes_without_labels_leaves_the_linear_probe_and_needs_enough_vectors():
    codes, _ = _clustered_codes()
    seg = build_segmenter(ModelConfig(code_dim=6, n_classes=3), 8, False)
    before = seg.linear_probe.conv.weight.clone()
    assert fit_probes(seg, codes, None, seed=0, n_vectors=100)["linear"] is False
    assert torch.equal(seg.linear_probe.conv.weight, before)
    with pytest.raises(ValueError, match="code vectors for 3 clusters"):
        fit_probes(seg, codes[:1, :, :1, :1], None, seed=0, n_vectors=1)


def test_fit_linear_probe_refuses_maps_without_labels():
    codes, labels = _clustered_codes()
    with pytest.raises(ValueError, match="no labelled pixel"):
        fit_linear_probe(codes, torch.full_like(labels, -1), 3, seed=0)
