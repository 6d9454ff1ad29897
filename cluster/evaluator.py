"""Distributed evaluation: GPU actors score validation shards, the dense CRF fans out over the CPUs.

``EvalWorker`` actors (``cluster.raycluster.ActorGroup``, the pool every Ray stage uses: Ray
restarts a dead actor and resubmits its call) take one shard per call. Per batch they run the one
evaluation path (``depthg.evaluation.predict_scores``: codes -> upsample -> probe scores) and count
the plain heads' int64 confusion matrices; with ``eval.crf`` each image's probe scores go to a
1-CPU Ray task (``crf_task``, retried by Ray when its worker or node dies) that returns the CRF
heads' confusions, so the CRF, the slow part, runs on every CPU of the cluster while the actors
keep their GPUs busy (each actor keeps at most ``CRF_IN_FLIGHT`` images' tasks pending). Actors
hold one GPU and no CPU (``eval.device`` cuda; ``eval.num_workers`` 0 = one per GPU) or, on a
CPU-only cluster, are placed where a CPU is free but hold none, so CRF tasks can always run.

Batches never cross shards, so any assignment of shards to actors gives the same batches. The
driver reduces each shard's result as it arrives (``EvalTotals``: int64 matrices summed, the
``eval.report_images`` samples with the smallest ids kept, whatever the order) and calls
``depthg.metrics.score_confusions`` once on the sums: one Hungarian matching over the whole split. Its
memory is O(heads x clusters x classes + samples shown), not O(split); an actor keeps only its shard's
report candidates. With ``eval.kmeans`` the shards' codes (``KMEANS_PER_IMAGE`` per image) are reduced the
same way into a seeded sample of at most ``KMEANS_CODES`` vectors (``depthg.metrics.CodeSample``: all of
them, in shard order, for a split of up to 1562 images), on which the centroids are fitted. ``workers=0``
runs the same worker and the same CRF function in-process: the result is identical.

    result = evaluate(cfg, CheckpointModel(url), shard_list(cfg.shards.root))
"""
from __future__ import annotations

import sys
import time
import zlib
from typing import Callable, Iterable, Sequence

import numpy as np

from cluster.raycluster import node_id
from depthg import io, metrics, shards

KMEANS_PER_IMAGE = 64  # code vectors sampled per image for k-means fitting
KMEANS_CODES = 100_000  # at most this many of them fit k-means (a seeded sample of the split's beyond 1562 images)
CRF_IN_FLIGHT = 16  # CRF tasks (one image each, ~22 MB of scores at 320 px x 54 classes) pending per actor
ModelFn = Callable[[], tuple]  # () -> (backbone, segmenter)


class CheckpointModel:
    """Picklable model factory: the segmenter of a checkpoint URL (depthg or reference Lightning) and its backbone
    (``depthg.checkpoint.load_model``: the weights the file carries, else the one its config names)."""

    def __init__(self, url: str):
        self.url = url

    def __call__(self):
        from depthg.checkpoint import load_model

        _, backbone, segmenter, _ = load_model(self.url)
        return backbone, segmenter


class RandomModel:
    """Picklable factory of a seeded, untrained model (benchmarks and tests; no checkpoint needed)."""

    def __init__(self, backbone: str, weights: str = "random", code_dim: int = 16, n_classes: int = 3,
                 extra_clusters: int = 0, seed: int = 0):
        self.args = (backbone, weights, code_dim, n_classes, extra_clusters, seed)

    def __call__(self):
        import torch

        from depthg.models import Segmenter, build_backbone

        name, weights, code_dim, n_classes, extra, seed = self.args
        backbone = build_backbone(name, weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            segmenter = Segmenter(backbone.dim, code_dim, n_classes, extra)
        return backbone, segmenter


def read_checkpoint(url: str, isolated: bool = False) -> tuple[dict, dict]:
    """(config as a dict, extra) of a segmenter.pt or a reference Lightning .ckpt, read once (safely:
    ``depthg.checkpoint``). ``isolated``: read in a short-lived child process, so that neither torch nor the
    file's tensors ever enter this one: the driver of a Ray evaluation imports no torch and holds, for the
    whole run, only the reduced results (``EvalTotals``, ``metrics.CodeSample``); a process that imported torch
    already (``launch/pipeline.py`` after training) reads it itself. A refusal is raised here."""
    if not io.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    if not isolated or "torch" in sys.modules:
        return _read_checkpoint(url)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_read_checkpoint, url).result()


def _read_checkpoint(url: str) -> tuple[dict, dict]:
    from depthg.checkpoint import load_segmenter
    from depthg.config import to_dict

    cfg, _, extra = load_segmenter(url)
    return (cfg if isinstance(cfg, dict) else to_dict(cfg)), extra


def find_split(url: str, split: str = "val") -> tuple[list[str], dict]:
    """(shard URLs, manifest) of a split: ``url`` may hold a manifest itself, or be a shards root with
    ``{root}/depth/{split}/`` (stage 1: lossless, native size, preferred: evaluation resizes to its own
    ``eval.resolution``) or ``{root}/{split}/`` (stage 2: stored at the training resolution, possibly lossy)."""
    candidates = [url, shards.split_dir(url, split, "depth"), shards.split_dir(url, split, "train")]
    for folder in candidates:
        if io.exists(io.join(folder, shards.MANIFEST)):
            manifest = shards.read_manifest(folder)
            return [io.join(folder, s["name"]) for s in manifest["shards"]], manifest
    raise FileNotFoundError(f"no shard manifest for split '{split}' under {url}: looked for "
                            + ", ".join(io.join(f, shards.MANIFEST) for f in candidates))


def shard_list(url: str, split: str = "val") -> list[str]:
    """Shard URLs of a split (see ``find_split``)."""
    return find_split(url, split)[0]


def _keep_first(samples: list, new: list, n: int, key=lambda s: s["id"]) -> list:
    """The ``n`` samples with the smallest ids (so the choice depends neither on how the split is cut into shards
    nor on the order results arrive in)."""
    return sorted([*samples, *new], key=key)[:n] if n > 0 else []


class EvalWorker:
    """Evaluates shards with one model copy; used in-process or as a Ray actor (one shard per call).

    ``crf_tasks``: send the CRF to Ray tasks (the actor's node and the rest of the cluster) instead
    of running it here."""

    def __init__(self, eval_cfg: dict, n_classes: int, model_fn: ModelFn, threads: int | None = None,
                 device: str = "auto", crf_tasks: bool = False):
        from cluster.raycluster import check_node

        check_node()  # first: a node that failed its start-up check stops here, once, with its message
        import torch

        from depthg.device import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.cfg = dict(eval_cfg)
        self.n_classes = int(n_classes)
        self.device = resolve_device(device)
        self.crf_tasks = bool(crf_tasks)
        backbone, segmenter = model_fn()
        self.backbone = backbone.to(self.device).eval()
        self.segmenter = segmenter.to(self.device).eval()

    def _batches(self, url: str):
        from depthg import evaluation

        size, batch = int(self.cfg["resolution"]), int(self.cfg["batch_size"])
        pending = []
        for raw in shards.iter_shard(url):
            pending.append(evaluation.prepare(shards.decode_sample(raw), size))
            if len(pending) == batch:
                yield pending
                pending = []
        if pending:
            yield pending

    def sample_codes(self, url: str, per_image: int, seed: int = 0) -> dict[str, np.ndarray]:
        """``{url: code vectors}`` for k-means fitting (``per_image`` random locations per image).

        Seeded per shard name, so the codes do not depend on how shards are split over workers.
        """
        import torch

        from depthg import evaluation

        shard = zlib.crc32(url.rsplit("/", 1)[-1].encode())
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, shard]).generate_state(1)[0]))
        parts = [evaluation.sample_codes(self.backbone, self.segmenter, evaluation.collate(b)[0].to(self.device),
                                         per_image, bool(self.cfg["flip"]), gen) for b in self._batches(url)]
        return {url: torch.cat(parts).numpy()} if parts else {}

    def run(self, url: str, centroids: np.ndarray | None = None) -> dict:
        """One shard: ``{"confusion": {head: int64 [rows, n_classes]}, "images", "seconds", "samples", "node"}``;
        ``samples``: this shard's ``report_images`` with the smallest ids (only those are kept while it runs)."""
        import torch

        from depthg import evaluation

        opts = evaluation.EvalOptions(self.n_classes, flip=bool(self.cfg["flip"]), crf=bool(self.cfg["crf"]),
                                      centroids=None if centroids is None else torch.tensor(centroids))
        rows = evaluation.n_predictions(self.segmenter, opts)
        start, cpu_start = time.perf_counter(), time.process_time()
        limit = int(self.cfg["report_images"])
        total, crf, cands, images = {}, [], [], 0  # crf: per image, a pending task (or its result)
        for batch in self._batches(url):
            images_t, labels = evaluation.collate(batch)
            if labels is None:
                raise ValueError(f"evaluation needs labels; sample {batch[0]['id']} has no label.png")
            scores, preds = evaluation.predict_scores(self.backbone, self.segmenter, images_t.to(self.device), opts)
            _add(total, evaluation.batch_confusions(preds, labels, rows, opts.n_classes))
            new = []
            for i, sample in enumerate(batch):
                if opts.crf:
                    crf.append(self._crf(images_t[i:i + 1], {k: v[i:i + 1].cpu() for k, v in scores.items()},
                                         labels[i:i + 1], rows, opts, crf))
                if limit > 0:
                    new.append((sample, preds["cluster"][i].to(torch.int16), len(crf) - 1))
            cands = _keep_first(cands, new, limit, key=lambda c: c[0]["id"])
            images += len(batch)
        crf = self._resolve(crf)
        for confs, _ in crf:
            _add(total, confs)
        keep = [_report_sample(s, crf[j][1]["cluster_crf"][0] if opts.crf else pred) for s, pred, j in cands]
        return {"confusion": total, "images": images, "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu_start, "samples": keep, "node": node_id()}

    def fit_centroids(self, codes: np.ndarray, k: int, seed: int) -> np.ndarray:
        """k-means centroids ``[k, Q]`` of ``codes`` (``depthg.evaluation.fit_kmeans``), on the CPU with one torch
        thread whatever this worker's device and share: the same centroids in this process and in any actor."""
        import torch

        from depthg import evaluation

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return evaluation.fit_kmeans(torch.from_numpy(np.ascontiguousarray(codes)), k, seed=seed).numpy()
        finally:
            torch.set_num_threads(threads)

    def _crf(self, image, scores, label, rows, opts, pending: list):
        args = (image, scores, label, rows, opts.n_classes, opts.crf_params)
        return submit_cpu_task(crf_task, args, pending) if self.crf_tasks else crf_task(*args)

    def _resolve(self, items: list) -> list:
        return resolve(items) if self.crf_tasks else items


def crf_task(image: torch.Tensor, scores: dict, label: torch.Tensor, rows: dict, n_classes: int,
             params) -> tuple[dict, dict]:
    """Dense CRF of one image's probe scores: ``(confusions, predictions as int16)`` of the CRF heads."""
    import torch

    from depthg import evaluation

    preds = evaluation.crf_predictions(image, scores, params)
    confs = evaluation.batch_confusions(preds, label, rows, n_classes)
    return confs, {k: v.to(torch.int16) for k, v in preds.items()}


_CPU_TASKS: dict = {}


def cpu_task(fn):
    """``fn`` as a 1-CPU Ray task (the dense CRF is single-threaded); Ray retries one whose worker or node died."""
    if fn not in _CPU_TASKS:
        import ray

        _CPU_TASKS[fn] = ray.remote(num_cpus=1, max_retries=3)(fn)
    return _CPU_TASKS[fn]


def submit_cpu_task(fn, args: tuple, pending: list, limit: int = CRF_IN_FLIGHT):
    """Submit ``fn(*args)`` as a ``cpu_task`` once at most ``limit`` of the ``pending`` ones still run (backpressure:
    the inputs of pending tasks stay in the object store); returns its ObjectRef. Used by evaluation (CRF heads'
    confusions) and distributed segmentation (label maps)."""
    import ray

    refs = [p for p in pending if isinstance(p, ray.ObjectRef)]
    if len(refs) >= limit:
        ray.wait(refs, num_returns=len(refs) - limit + 1)
    return cpu_task(fn).remote(*args)


def resolve(items: list) -> list:
    """The results of submitted ``cpu_task`` refs (items that are not refs pass through), in order."""
    if not items:
        return items
    import ray

    refs = [i for i, x in enumerate(items) if isinstance(x, ray.ObjectRef)]
    values = ray.get([items[i] for i in refs])
    out = list(items)
    for i, v in zip(refs, values):
        out[i] = v
    return out


def _add(total: dict, confs: dict) -> None:
    for k, v in confs.items():
        total[k] = total[k] + v if k in total else v


def _report_sample(s: dict, pred: torch.Tensor) -> dict:
    """What the report's grid draws of one image (the cluster head's prediction, CRF-refined with ``eval.crf``)."""
    depth = None if s["depth"] is None else (np.clip(s["depth"], 0, 1) * 255).astype(np.uint8)
    return {"id": s["id"], "image": s["image"], "depth": depth, "label": np.asarray(s["label"]).astype(np.int16),
            "pred": pred.numpy().astype(np.int16)}


class EvalTotals:
    """The per-shard results reduced as they arrive: int64 confusions summed per head, images counted, the
    ``report_images`` samples with the smallest ids kept (the same choice whatever the order), the shards'
    seconds and nodes. Memory: O(heads x clusters x classes + samples shown), never O(split)."""

    def __init__(self, report_images: int):
        self.report_images = int(report_images)
        self.confusion: dict[str, np.ndarray] = {}
        self.images, self.samples, self.nodes = 0, [], set()
        self.shard_seconds, self.shard_cpu_seconds = [], []

    def add(self, result: dict) -> None:
        if not result["confusion"]:  # a shard without images
            return
        for k, v in result["confusion"].items():
            v = np.asarray(v, np.int64)
            self.confusion[k] = self.confusion[k] + v if k in self.confusion else v.copy()
        self.images += int(result["images"])
        self.samples = _keep_first(self.samples, result["samples"], self.report_images)
        self.shard_seconds.append(result["seconds"])
        self.shard_cpu_seconds.append(result["cpu_seconds"])
        if result.get("node"):
            self.nodes.add(result["node"])

    def result(self) -> dict:
        if not self.confusion:
            raise ValueError("evaluation saw no images: are the shards empty?")
        return {"confusion": dict(self.confusion), "images": self.images, "shard_seconds": self.shard_seconds,
                "shard_cpu_seconds": self.shard_cpu_seconds, "nodes": sorted(self.nodes), "samples": self.samples}


def sum_results(results: Iterable[dict], report_images: int) -> dict:
    """Reduce per-shard results as they come (``EvalTotals``): summed matrices and counts, the report samples
    with the smallest ids."""
    totals = EvalTotals(report_images)
    for r in results:
        totals.add(r)
    return totals.result()


def evaluate(cfg, model_fn: ModelFn, urls: Sequence[str], workers: int | None = None, progress: bool = False,
             crf_tasks: bool = False) -> dict:
    """Evaluate ``urls``; returns summed confusions, ``scores`` (``depthg.metrics``), counts, timings
    and report samples. ``workers``: None = ``eval.num_workers`` Ray actors (0 there = one per GPU,
    or 2 on a CPU-only cluster); an explicit 0 = in this process, no Ray (with ``crf_tasks``: the CRF
    as ``cpu_task``s of the Ray this process is connected to, e.g. in a Tune trial's placement group)."""
    ev = cfg.eval
    eval_cfg = {k: getattr(ev, k) for k in ("resolution", "flip", "crf", "batch_size", "report_images")}
    start = time.perf_counter()
    totals = EvalTotals(ev.report_images)
    if workers is not None and int(workers) <= 0:
        w = EvalWorker(eval_cfg, cfg.model.n_classes, model_fn, device=ev.device, crf_tasks=crf_tasks and ev.crf)
        centroids = _kmeans_centroids(cfg, urls, (w.sample_codes(u, KMEANS_PER_IMAGE) for u in urls),
                                      w.fit_centroids) if ev.kmeans else None
        for u in urls:
            totals.add(w.run(u, centroids))
        used = 0
    else:
        used = _run_ray(cfg, eval_cfg, model_fn, urls, ev.num_workers if workers is None else int(workers),
                        progress, totals)
    out = totals.result()
    out["scores"] = metrics.score_confusions(out["confusion"])
    out["seconds"] = time.perf_counter() - start
    out["workers"] = used
    return out


def eval_group(cfg, eval_cfg: dict, model_fn: ModelFn, workers: int, max_actors: int):
    """The pool of evaluation actors: one GPU and no CPU each, or (CPU-only) Ray's default placement."""
    from cluster.raycluster import ActorGroup

    crf_tasks = bool(eval_cfg["crf"])
    return ActorGroup(EvalWorker, (eval_cfg, cfg.model.n_classes, model_fn), workers, max_actors, threads=1,
                      device=cfg.eval.device, options_fn=gpu_actor_options, init_kwargs={"crf_tasks": crf_tasks})


def gpu_actor_options(device: str, planned: dict) -> dict:
    """Ray options of an actor that sends its CPU work to ``cpu_task``s: one GPU and no CPU, or (CPU-only) Ray's
    default placement (placed where a CPU is free, holding none); a held CPU would be one less for the tasks: on a
    small cluster they could never start."""
    return {"num_gpus": 1, "num_cpus": 0} if device == "cuda" else {}


def _run_ray(cfg, eval_cfg: dict, model_fn: ModelFn, urls: Sequence[str], workers: int, progress: bool,
             totals: EvalTotals) -> int:
    """Shards over the actor pool (one shard per call), k-means codes first when asked for; each result is
    reduced into ``totals`` as it arrives. Returns the number of actors."""
    from cluster.raycluster import connect

    connect()  # joins RAY_ADDRESS / a local `ray start` when there is one, else starts a local Ray
    with eval_group(cfg, eval_cfg, model_fn, workers, max_actors=len(urls)) as group:
        centroids = None
        if cfg.eval.kmeans:
            codes = group.map("sample_codes", [(u, KMEANS_PER_IMAGE) for u in urls], "k-means codes", progress)
            centroids = _kmeans_centroids(cfg, urls, codes, lambda *args: group.call("fit_centroids", *args))
        for result in group.map("run", [(u, centroids) for u in urls], "evaluation", progress):
            totals.add(result)
        return len(group.actors)


def _kmeans_centroids(cfg, urls: Sequence[str], code_parts: Iterable[dict], fit: Callable) -> np.ndarray:
    """Fit k-means (n_classes + extra_clusters centroids) on at most ``KMEANS_CODES`` code vectors: the shards'
    codes reduced as they arrive into a seeded sample (``metrics.CodeSample``; every code, in shard order,
    when the split has no more), fitted by ``fit(codes, k, seed)`` (an ``EvalWorker.fit_centroids``: here or on an
    actor, so the driver never imports torch)."""
    position = {u: i for i, u in enumerate(urls)}
    sample = metrics.CodeSample(KMEANS_CODES, seed=cfg.train.seed)
    for part in code_parts:
        for u, c in part.items():
            sample.add(position[u], c)
    return fit(sample.codes(), cfg.model.n_classes + cfg.model.extra_clusters, cfg.train.seed)
