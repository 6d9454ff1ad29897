"""Distributed evaluation: validation shards spread over Ray actors, confusion matrices summed.

Each ``EvalWorker`` (a plain class; ``ray.remote`` wraps it as an actor, one GPU each where the
cluster has GPUs, else one CPU and one thread) streams its own list of shards, batches the samples
of each shard (batches never cross shards, so any split of the shard list gives the same batches),
and returns int64 confusion matrices per head (``depthg.evaluation``). The driver sums them and
calls ``depthg.metrics.score_confusions`` once. ``workers=0`` runs the same worker in-process:
the result is identical to any number of Ray workers.

    result = evaluate(cfg, CheckpointModel(url), shard_list(cfg.shards.root), workers=2)
"""
from __future__ import annotations

import time
import zlib
from typing import Callable, Sequence

import numpy as np
import torch

from depthg import evaluation, io, metrics, shards

KMEANS_PER_IMAGE = 64  # code vectors sampled per image for k-means fitting
ModelFn = Callable[[], tuple]  # () -> (backbone, segmenter)


class CheckpointModel:
    """Picklable model factory: the segmenter of a checkpoint URL and the backbone it names."""

    def __init__(self, url: str):
        self.url = url

    def __call__(self):
        from depthg.checkpoint import load_segmenter
        from depthg.models import build_backbone

        loaded = load_segmenter(self.url)
        cfg, segmenter = loaded[0], loaded[1]
        model = cfg["model"] if isinstance(cfg, dict) else cfg.model
        get = (lambda k: model[k]) if isinstance(model, dict) else (lambda k: getattr(model, k))
        return build_backbone(get("backbone"), get("weights")), segmenter


class RandomModel:
    """Picklable factory of a seeded, untrained model (benchmarks and tests; no checkpoint needed)."""

    def __init__(self, backbone: str, weights: str = "random", code_dim: int = 16, n_classes: int = 3,
                 extra_clusters: int = 0, seed: int = 0):
        self.args = (backbone, weights, code_dim, n_classes, extra_clusters, seed)

    def __call__(self):
        from depthg.models import Segmenter, build_backbone

        name, weights, code_dim, n_classes, extra, seed = self.args
        backbone = build_backbone(name, weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            segmenter = Segmenter(backbone.dim, code_dim, n_classes, extra)
        return backbone, segmenter


def find_split(url: str, split: str = "val") -> tuple[list[str], dict]:
    """(shard URLs, manifest) of a split: ``url`` may hold a manifest itself, or be a shards root
    with ``{root}/{split}/`` (stage 2) or ``{root}/depth/{split}/`` (stage 1)."""
    candidates = [url, shards.split_dir(url, split, "train"), shards.split_dir(url, split, "depth")]
    for folder in candidates:
        if io.exists(io.join(folder, shards.MANIFEST)):
            manifest = shards.read_manifest(folder)
            return [io.join(folder, s["name"]) for s in manifest["shards"]], manifest
    raise FileNotFoundError(f"no shard manifest for split '{split}' under {url}: looked for "
                            + ", ".join(io.join(f, shards.MANIFEST) for f in candidates))


def shard_list(url: str, split: str = "val") -> list[str]:
    """Shard URLs of a split (see ``find_split``)."""
    return find_split(url, split)[0]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _keep_first(samples: list[dict], new: list[dict], n: int) -> list[dict]:
    """The ``n`` samples with the smallest ids (so the choice does not depend on the split)."""
    return sorted(samples + new, key=lambda s: s["id"])[:n]


class EvalWorker:
    """Evaluates lists of shards with one model copy; used in-process or as a Ray actor."""

    def __init__(self, eval_cfg: dict, n_classes: int, model_fn: ModelFn, threads: int | None = None,
                 device: str = "auto"):
        if threads:
            torch.set_num_threads(threads)  # CRF and CPU inference: parallelism comes from actors
        self.cfg = dict(eval_cfg)
        self.n_classes = int(n_classes)
        self.device = pick_device(device)
        backbone, segmenter = model_fn()
        self.backbone = backbone.to(self.device).eval()
        self.segmenter = segmenter.to(self.device).eval()

    def _batches(self, urls: Sequence[str]):
        size, batch = int(self.cfg["resolution"]), int(self.cfg["batch_size"])
        for url in urls:
            pending = []
            for raw in shards.iter_shard(url):
                pending.append(evaluation.prepare(shards.decode_sample(raw), size))
                if len(pending) == batch:
                    yield pending
                    pending = []
            if pending:
                yield pending

    def sample_codes(self, urls: Sequence[str], per_image: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Code vectors per shard for k-means fitting (``per_image`` random locations per image).

        Seeded per shard name, so the codes do not depend on how shards are split over workers.
        """
        out = {}
        for url in urls:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(url.rsplit("/", 1)[-1].encode()))
            parts = [evaluation.sample_codes(self.backbone, self.segmenter,
                                             evaluation.collate(b)[0].to(self.device), per_image,
                                             bool(self.cfg["flip"]), gen) for b in self._batches([url])]
            if parts:
                out[url] = torch.cat(parts).numpy()
        return out

    def run(self, urls: Sequence[str], centroids: np.ndarray | None = None) -> dict:
        """``{"confusion": {head: int64 [rows, n_classes]}, "images", "seconds", "samples"}``."""
        opts = evaluation.EvalOptions(self.n_classes, flip=bool(self.cfg["flip"]), crf=bool(self.cfg["crf"]),
                                      centroids=None if centroids is None else torch.as_tensor(centroids))
        total, n_images, keep = None, 0, []
        start, cpu_start = time.perf_counter(), time.process_time()
        for batch in self._batches(urls):
            images, labels = evaluation.collate(batch)
            if labels is None:
                raise ValueError(f"evaluation needs labels; sample {batch[0]['id']} has no label.png")
            confs, preds = evaluation.evaluate_batch(self.backbone, self.segmenter, images.to(self.device),
                                                     labels, opts)
            total = confs if total is None else {k: total[k] + v for k, v in confs.items()}
            n_images += len(batch)
            keep = _keep_first(keep, _report_samples(batch, preds, opts.crf), int(self.cfg["report_images"]))
        return {"confusion": total or {}, "images": n_images, "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu_start, "samples": keep}


def _report_samples(batch: list[dict], preds: dict, crf: bool) -> list[dict]:
    head = "cluster_crf" if crf else "cluster"
    out = []
    for i, s in enumerate(batch):
        depth = None if s["depth"] is None else (np.clip(s["depth"], 0, 1) * 255).astype(np.uint8)
        out.append({"id": s["id"], "image": s["image"], "depth": depth, "label": s["label"],
                    "pred": preds[head][i].numpy().astype(np.int16), "linear": preds["linear"][i].numpy()})
    return out


def sum_results(results: Sequence[dict], report_images: int) -> dict:
    """Add the workers' matrices and counts; keep the report samples with the smallest ids."""
    results = [r for r in results if r["confusion"]]
    if not results:
        raise ValueError("evaluation saw no images: are the shards empty?")
    confusion = {k: np.sum([r["confusion"][k] for r in results], axis=0).astype(np.int64)
                 for k in results[0]["confusion"]}
    samples: list[dict] = []
    for r in results:
        samples = _keep_first(samples, r["samples"], report_images)
    return {"confusion": confusion, "images": sum(r["images"] for r in results),
            "worker_seconds": [r["seconds"] for r in results],
            "worker_cpu_seconds": [r["cpu_seconds"] for r in results], "samples": samples}


def _ray_workers(ray, n: int, args: tuple) -> list:
    # one GPU per actor where the cluster has enough, shared fractions where it has fewer
    gpus = ray.cluster_resources().get("GPU", 0)
    per = {"num_cpus": 1, "num_gpus": min(1.0, gpus / n)} if gpus > 0 else {"num_cpus": 1}
    actor = ray.remote(**per)(EvalWorker)
    return [actor.remote(*args) for _ in range(n)]


def evaluate(cfg, model_fn: ModelFn, urls: Sequence[str], workers: int | None = None) -> dict:
    """Evaluate ``urls`` with ``workers`` Ray actors (``0`` = in this process); returns summed
    confusions, ``scores`` (``depthg.metrics``), counts, timings and report samples."""
    ev = cfg.eval
    workers = ev.num_workers if workers is None else int(workers)
    eval_cfg = {k: getattr(ev, k) for k in ("resolution", "flip", "crf", "batch_size", "report_images")}
    n_classes = cfg.model.n_classes
    start = time.perf_counter()
    if workers <= 0:
        w = EvalWorker(eval_cfg, n_classes, model_fn)
        centroids = _kmeans_centroids(cfg, urls, [w.sample_codes(urls, KMEANS_PER_IMAGE)]) if ev.kmeans else None
        results = [w.run(urls, centroids)]
    else:
        results = _run_ray(cfg, eval_cfg, model_fn, urls, workers)
    out = sum_results(results, ev.report_images)
    out["scores"] = metrics.score_confusions(out["confusion"])
    out["seconds"] = time.perf_counter() - start
    out["workers"] = workers
    return out


def _run_ray(cfg, eval_cfg: dict, model_fn: ModelFn, urls: Sequence[str], workers: int) -> list[dict]:
    """Split the shards over ``workers`` actors (one torch thread each) and gather their results."""
    import ray

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set, else starts a local Ray
    parts = [p for p in (shards.split_shards(urls, i, workers) for i in range(workers)) if p]
    actors = _ray_workers(ray, len(parts), (eval_cfg, cfg.model.n_classes, model_fn, 1))
    try:
        centroids = None
        if cfg.eval.kmeans:
            codes = ray.get([a.sample_codes.remote(p, KMEANS_PER_IMAGE) for a, p in zip(actors, parts)])
            centroids = _kmeans_centroids(cfg, urls, codes)
        return ray.get([a.run.remote(p, centroids) for a, p in zip(actors, parts)])
    finally:
        for a in actors:
            ray.kill(a)


def _kmeans_centroids(cfg, urls: Sequence[str], code_parts: Sequence[dict]) -> np.ndarray:
    """Fit k-means (n_classes + extra_clusters centroids) on the codes of every shard, in shard order."""
    by_url = {u: c for part in code_parts for u, c in part.items()}
    codes = torch.from_numpy(np.concatenate([by_url[u] for u in urls if u in by_url]))
    k = cfg.model.n_classes + cfg.model.extra_clusters
    return evaluation.fit_kmeans(codes, k, seed=cfg.train.seed).numpy()
