"""Validation during training and the checkpoint choice (``train.select``).

``validate`` runs every ``train.val_every`` batches over the WHOLE val split: each rank reads its slice
once (``depthg.streaming.eval_batches``: manifest order, a partial last batch allowed), computes codes
with the training step in eval mode and cluster-probe predictions through ``depthg.evaluation.probe_scores``
(the one codes -> upsample -> probe path, no CRF), and the int64 confusion matrix, the held-out STEGO
loss (weighted by batch size) and the sample count are summed over ranks once at the end. So every val
sample counts exactly once, for any world size, and ranks with fewer batches wait only at that sum.

Checkpoint choice, ``train.select``:

* ``none``: ``segmenter.pt`` is the last one.
* ``label_free``: the lowest held-out STEGO loss (self + kNN + negative terms, weighted, without the depth
  term). It is the training objective measured on data the head never trained on, so it needs no labels;
  the depth term is left out because its weight and shift decay on a schedule, which would make values
  from different batches incomparable; the cluster-probe loss is not used because it rewards collapsed
  codes (all codes equal give a perfect k-means fit).
* ``val_miou``: the highest validation cluster mIoU, as the reference code (leonsick/depthg, STEGO) kept
  its checkpoints. It USES THE VALIDATION LABELS: the kept file's metadata says so (``uses_labels: true``)
  and the evaluation report shows it.
"""
from __future__ import annotations

import numpy as np
import torch

from cluster.distributed import all_reduce_sum
from depthg import io, streaming
from depthg.config import Config
from depthg.world import World

VAL_SALT = 99  # separates the validation generator (negatives, sampling) from the training streams
SELECT = {  # train.select -> (score key, +1 higher is better / -1 lower is better, uses labels, criterion)
    "label_free": ("val/stego", -1, False, "lowest held-out STEGO loss on the val split (no labels)"),
    "val_miou": ("val/miou", +1, True, "highest validation cluster mIoU (uses the val labels, as the reference)"),
}


def val_spec(cfg: Config, world: World) -> streaming.StreamSpec:
    """The val split (mined ``{root}/val``, else depth ``{root}/depth/val`` with the crop as positive)."""
    kw = dict(rank=world.rank, world_size=world.world_size, micro_batch=cfg.train.micro_batch_per_gpu,
              resolution=cfg.data.resolution, shuffle_buffer=0, seed=cfg.train.seed)
    try:
        spec, _ = streaming.open_split(cfg.shards.root, "val", **kw)
    except FileNotFoundError:
        spec, _ = streaming.open_split(io.join(cfg.shards.root, "depth"), "val", **kw)
    return spec


def val_sums(backbone, segmenter, cfg: Config, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """``(confusion int64 [clusters, classes], [stego loss x n, n, samples] float64)`` over all ranks; ``n``
    counts the samples of batches with a STEGO loss (a batch of one sample has no negatives)."""
    from depthg import evaluation, metrics
    from depthg.step import backbone_features, compute_losses

    spec = val_spec(cfg, world)
    conf = torch.zeros(segmenter.n_clusters, segmenter.n_classes, dtype=torch.int64)
    sums, samples = torch.zeros(2, dtype=torch.float64), 0
    seed = int(np.random.SeedSequence([cfg.train.seed, world.rank, VAL_SALT]).generate_state(1)[0])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for batch in streaming.eval_batches(spec):
            n = len(batch["id"])
            if n >= 2:
                out = compute_losses(backbone, segmenter, batch, cfg, 0, gen, training=False)
                codes = out["codes"]
                sums += torch.tensor([float(out["stego"]) * n, n], dtype=torch.float64)
            else:  # one sample (a short last batch) has no negatives: codes only, no STEGO loss
                image = batch["image"].to(next(segmenter.parameters()).device)
                dtype = next(segmenter.head.parameters()).dtype
                codes = segmenter.head(backbone_features(backbone, image, dtype).to(dtype)).float()
            labels = batch["label"]
            scores = evaluation.probe_scores(segmenter, codes, labels.shape[-2:], ("cluster",))
            pred = scores["cluster"].argmax(dim=1).cpu()
            conf += torch.from_numpy(metrics.confusion(pred.numpy(), labels.numpy(), *conf.shape))
            samples += n
    sums = torch.cat([sums, torch.tensor([samples], dtype=torch.float64)])
    return all_reduce_sum(conf, world), all_reduce_sum(sums, world)


def validate(backbone, segmenter, cfg: Config, world: World) -> dict:
    """Cluster-probe mIoU / accuracy (no CRF), held-out STEGO loss and the sample count, over all ranks."""
    from depthg import metrics

    conf, sums = val_sums(backbone, segmenter, cfg, world)
    scores = metrics.hungarian_scores(conf.numpy())
    return {"val/miou": float(scores["miou"]), "val/accuracy": float(scores["accuracy"]),
            "val/stego": float(sums[0] / sums[1].clamp(min=1)), "val/samples": float(sums[2])}


def improved(select: str, scores: dict, best: dict) -> bool:
    """Whether ``scores`` beat ``best`` under ``train.select`` (always, for the first scores)."""
    key, sign = SELECT[select][:2]
    return key not in best or sign * scores[key] > sign * best[key]


def keep_best(cfg: Config, segmenter, scores: dict, batch: int) -> dict:
    """Write ``segmenter_best.pt`` (``segmenter``: an fp32 CPU copy) with metadata saying how it was chosen
    (and whether labels were used)."""
    from depthg.checkpoint import save_segmenter

    _, _, uses_labels, criterion = SELECT[cfg.train.select]
    meta = {**scores, "batch": batch, "select": cfg.train.select, "uses_labels": uses_labels, "criterion": criterion}
    save_segmenter(io.join(cfg.train.output, "segmenter_best.pt"), cfg, segmenter, meta)
    return meta


def validate_and_select(backbone, engine, cfg: Config, world: World, log, batch_idx: int, best: dict) -> dict:
    """Validate ``engine.module``, log, and with ``train.select`` keep ``segmenter_best.pt`` (the fp32 master
    weights: ``cluster.engine.master_copy``, gathered on every rank) when the score improved."""
    from cluster.engine import master_copy

    scores = validate(backbone, engine.module, cfg, world)
    log.metrics(batch_idx, scores)
    log.print(f"batch {batch_idx + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    if cfg.train.select not in SELECT or not improved(cfg.train.select, scores, best):
        return best
    segmenter = master_copy(engine)  # every rank: the scores (summed over ranks) agree, so all arrive here
    if world.is_main:
        keep_best(cfg, segmenter, scores, batch_idx + 1)
    return {**scores, "batch": batch_idx + 1}
