"""Checks that need no worker, run in the launching process before anything starts.

``check(cfg, world_size)`` raises ``depthg.config.ConfigError`` naming the key or file and what was
expected, before any worker is spawned or any backbone loaded:

* ``sampling.samples`` against the backbone's feature grid at ``data.resolution`` (every backbone gives a
  stride-8 grid: ``depthg.models.backbones.Backbone.stride``), and the resolution a multiple of the stride;
* ``train.select`` without validation (``train.val_every=0``); a micro batch of one (no negatives);
* ``train.output``: a folder (local or s3://), not an existing file; a NEW run (``train.resume`` empty) needs
  an empty or missing folder, so a new config submitted into an old run's folder is refused naming
  ``--resume auto`` instead of continuing (or skipping) that run; with ``shared=True`` (Ray workers that may
  run on other machines: the launchers pass ``shared=not cluster.raycluster.started_here()``, since even
  ``--nodes 1`` trains on a worker node when the head has no CPUs) a local path is refused: the emptiness
  check would read the head's disk, Ray Train cannot reach a head-local path from its workers, and the
  checkpoints and ``segmenter.pt`` would land on a worker's disk, which the autoscaler deletes with the node;
* ``train.resume``: a complete checkpoint written with the same model settings;
* the shards: the train manifest (of the current stage-2 schema), every shard it lists, the resolution they
  were written at equal to ``data.resolution``, enough samples for one optimizer step of ``world_size``
  ranks, ``n_classes``, a val split when validation or a checkpoint choice needs one (a mined one of the
  current schema and resolution), and no setting that reads depth when the shards have none
  (``depthgen.source=none``).
"""
from __future__ import annotations

import dataclasses
import posixpath

from depthg import io, planner, shards
from depthg.config import Config, ConfigError, check_depth_free


def check(cfg: Config, world_size: int, shared: bool = False) -> None:
    """Every check below; ``shared``: the ranks may run on other machines than this one (``train.output`` must be
    shared storage)."""
    if cfg.train.select != "none" and not cfg.train.val_every:
        raise ConfigError(f"train.select={cfg.train.select} chooses among validation results: set train.val_every > 0")
    if cfg.train.micro_batch_per_gpu < 2:
        raise ConfigError("train.micro_batch_per_gpu=1: STEGO's negatives come from the other samples of a rank's "
                          "batch; expected at least 2")
    check_grid(cfg)
    check_output(cfg, shared)
    manifest = check_shards(cfg, world_size)
    if cfg.model.n_classes == 0:  # what the trainer will use (cluster.trainer.prepare)
        model = dataclasses.replace(cfg.model, n_classes=int(manifest["n_classes"]))
        cfg = dataclasses.replace(cfg, model=model)
    check_resume(cfg)


def check_grid(cfg: Config) -> None:
    from depthg.models.backbones import Backbone

    stride, res, s = Backbone.stride, cfg.data.resolution, cfg.sampling.samples
    if res % stride:
        raise ConfigError(f"data.resolution={res}: expected a multiple of the backbone stride {stride}")
    grid = res // stride
    if s * s > grid * grid:
        raise ConfigError(f"sampling.samples={s}: {s}^2 locations do not fit the {grid}x{grid} feature grid of "
                          f"model.backbone={cfg.model.backbone} at data.resolution={res} (stride {stride}); "
                          f"expected sampling.samples <= {grid}")


def check_output(cfg: Config, shared: bool = False) -> None:
    out = cfg.train.output
    if shared and not io.is_remote(out):
        raise ConfigError(f"train.output={out}: a local folder, but the training workers run on a Ray cluster this "
                          "process did not start, on nodes whose disks the autoscaler deletes (checkpoints and "
                          "segmenter.pt would be lost or scattered, and Ray Train cannot reach a path on this "
                          "machine); expected shared storage, e.g. train.output=s3://bucket/runs/NAME")
    fs, path = io.filesystem(out)
    if fs.isfile(path):
        raise ConfigError(f"train.output={out}: an existing file; expected a folder (local or s3://) for the run")
    if cfg.train.resume:
        return
    held = io.listdir(out)
    if held:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ConfigError(f"train.output={out} already holds a run ({shown}); continue it with --resume auto "
                          "(train.resume=auto; its model settings must match), or start a new run in a new or "
                          "empty train.output")


def check_resume(cfg: Config) -> None:
    from cluster.checkpoints import check_resume_config, resolve_resume

    url = resolve_resume(cfg)
    if url:
        check_resume_config(cfg, url)


def _manifest(folder: str) -> dict:
    try:
        return shards.read_manifest(folder)
    except FileNotFoundError as exc:
        raise ConfigError(f"shards.root={posixpath.dirname(folder)}: {exc}") from exc


def check_shards(cfg: Config, world_size: int) -> dict:
    """The train manifest, once every check on the shards passed."""
    folder = shards.split_dir(cfg.shards.root, "train", "train")
    manifest = _manifest(folder)
    present = set(io.listdir(folder))
    missing = [s["name"] for s in manifest["shards"] if s["name"] not in present]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConfigError(f"shards.root={cfg.shards.root}: {io.join(folder, shards.MANIFEST)} lists shards that are "
                          f"missing: {', '.join(missing[:5])}{more}; rerun python launch/mine_neighbors.py")
    check_resolution(cfg, folder, manifest)
    t = cfg.train
    try:
        planner.steps_per_epoch(int(manifest["total"]), t.micro_batch_per_gpu * world_size, t.grad_accum)
    except ValueError as exc:
        raise ConfigError(f"shards.root={cfg.shards.root} with {world_size} rank(s): {exc}") from exc
    if manifest.get("depth_source") == "none":
        check_depth_free(cfg, f"shards.root={cfg.shards.root} (written with depthgen.source=none)")
    if cfg.model.n_classes == 0 and int(manifest.get("n_classes") or 0) < 1:
        raise ConfigError(f"model.n_classes=0 and {io.join(folder, shards.MANIFEST)} has no n_classes: set model.n_classes")
    if t.val_every or t.select != "none":
        vals = [shards.split_dir(cfg.shards.root, "val", kind) for kind in ("train", "depth")]
        if not any(io.exists(io.join(v, shards.MANIFEST)) for v in vals):
            raise ConfigError(f"train.val_every={t.val_every} / train.select={t.select} need a val split: found no "
                              f"{' or '.join(io.join(v, shards.MANIFEST) for v in vals)}")
        if io.exists(io.join(vals[0], shards.MANIFEST)):  # the mined val split validation reads
            check_resolution(cfg, vals[0], _manifest(vals[0]))
    return manifest


def check_resolution(cfg: Config, folder: str, manifest: dict) -> None:
    """Stage-2 samples are stored at the training resolution: ``data.resolution`` must be the one they have."""
    stored = manifest.get("resolution")
    if stored and int(stored) != cfg.data.resolution:
        raise ConfigError(f"data.resolution={cfg.data.resolution}, but {io.join(folder, shards.MANIFEST)} was written "
                          f"at resolution {stored} (stage 2 stores samples at the training resolution): set "
                          f"data.resolution={stored}, or remine at {cfg.data.resolution} with python "
                          f"launch/mine_neighbors.py data.resolution={cfg.data.resolution} (the depth shards are reused)")
