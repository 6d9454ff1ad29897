"""Finishing (``train.finish=fit``): the probes of ``segmenter.pt`` refitted on the final codes.

After the last batch (and its checkpoint, which keeps the trained state for a resume), rank 0 refits the
probes of each segmenter it writes (``cluster.checkpoints.write_final``: ``segmenter_last.pt`` and
``segmenter.pt``, which is the ``train.select`` choice when there is one): it reads ``train.finish_samples``
train crops from shards spread evenly over the manifest, computes their codes with that segmenter's head
(eval mode, no dropout) and calls ``depthg.probes.fit_probes`` (seeded, deterministic): cluster centroids by
cosine k-means on the codes (no labels), the linear probe by a converged L-BFGS fit on the crops' labels.
``segmenter_best.pt`` keeps the probes it had when it was chosen.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from depthg import probes, streaming
from depthg.config import Config

FINISH_SALT = 7  # the k-means / linear-probe seed is (train.seed, FINISH_SALT)


def finish_seed(train_seed: int) -> int:
    """The seed of the k-means / linear-probe fit for ``train.seed``."""
    return int(np.random.SeedSequence([train_seed, FINISH_SALT]).generate_state(1)[0])


def finish_spec(spec: streaming.StreamSpec, samples: int) -> streaming.StreamSpec:
    """One rank's view of about ``samples`` train crops: whole shards spread evenly over the manifest, read in
    order on every rank alike (rank 0 of 1, no shuffling, no positive read: only the crops' codes are needed)."""
    counts = list(spec.counts)
    need = min(len(counts), max(1, math.ceil(samples / max(1.0, float(np.mean(counts))))))
    picks = sorted({int(round(i)) for i in np.linspace(0, len(counts) - 1, need)})
    return dataclasses.replace(spec, urls=[spec.urls[i] for i in picks], counts=[counts[i] for i in picks],
                               rank=0, world_size=1, shuffle_buffer=0, start_step=0, num_steps=0, with_positives=False)


@torch.no_grad()
def train_codes(backbone, segmenter, spec: streaming.StreamSpec, samples: int):
    """(codes float32 ``[N,Q,h,w]`` on the CPU, labels ``[N,H,W]``) of the first ``samples`` crops of ``spec``."""
    from depthg.step import backbone_features

    device, feat_device = next(segmenter.parameters()).device, next(backbone.parameters()).device
    dtype = next(segmenter.head.parameters()).dtype
    codes, labels, n = [], [], 0
    was_training = segmenter.training
    segmenter.eval()
    for batch in streaming.eval_batches(spec):
        take = min(len(batch["id"]), samples - n)
        feats = backbone_features(backbone, batch["image"][:take].to(feat_device), dtype).to(device)
        codes.append(segmenter.head(feats.to(dtype)).float().cpu())
        labels.append(batch["label"][:take])
        n += take
        if n >= samples:
            break
    segmenter.train(was_training)
    if not codes:
        raise ValueError("train.finish=fit: the train split yielded no crops")
    return torch.cat(codes), torch.cat(labels)


def finish(backbone, segmenter, cfg: Config, spec: streaming.StreamSpec, log) -> dict:
    """Refit ``segmenter``'s probes in place (``train.finish``); returns what was fitted (logged)."""
    if cfg.train.finish == "none":
        return {}
    samples = cfg.train.finish_samples
    codes, labels = train_codes(backbone, segmenter, finish_spec(spec, samples), samples)
    fitted = probes.fit_probes(segmenter, codes, labels, finish_seed(cfg.train.seed))
    out = {"finish/crops": int(codes.shape[0]), **{f"finish/{k}": v for k, v in fitted.items()}}
    log.print(f"finish: cluster probe fitted by k-means on {out['finish/cluster_vectors']} code vectors of "
              f"{out['finish/crops']} train crops (no labels); linear probe "
              + ("fitted by L-BFGS on their labels" if out["finish/linear"] else "kept (no labels)"))
    return out
