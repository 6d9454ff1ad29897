"""Training checkpoints and the final segmenter files under ``train.output`` (local folder or s3://).

* ``{output}/ckpt/step-NNNNNNNN/``: written by ``engine.save_checkpoint`` (each rank its files; for
  ``s3://`` outputs into a local staging folder, then uploaded through ``depthg.io``), then a ``COMPLETE``
  marker written LAST by rank 0 after a barrier: only marked folders count (``latest_checkpoint``).
  The marker is ``{"batch", "model": model_signature(cfg), "run"}``; a resume with other model settings
  fails naming the checkpoint and the keys (``check_resume_config``). ``run`` names the launch that wrote
  it (Ray Train: one id per ``fit``), so a restarted worker group finds the newest checkpoint of its own
  run (``latest_checkpoint(output, run)``) even when it died before Ray registered that checkpoint.
* The client state holds the batch index, the step generator state and the selection's best scores, so
  a resumed run continues with the same schedule values, random draws and data position.
* Resume loads DeepSpeed's files safely (``safe_loads``): ``torch.load(weights_only=True)`` with only the three
  DeepSpeed classes its checkpoints hold allowed (``deepspeed_safe_globals``: ZeRO 1's ``fragment_address``,
  ``ZeroStageEnum``, ``LossScaler``), instead of DeepSpeed's own full unpickling; a file with any other object
  (code a pickle would run) is refused with a ``CheckpointError`` naming it, before anything is executed.
* ``write_final``: ``segmenter_last.pt``, ``segmenter.pt`` (the selected one, see
  ``cluster.validation``) and the resolved ``config.yaml``.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from typing import Callable

from cluster.distributed import barrier
from depthg import io
from depthg.config import Config, ConfigError, save_config
from depthg.checkpoint import CheckpointError
from depthg.world import World

COMPLETE = "COMPLETE"


def tag_name(batch_idx: int) -> str:
    return f"step-{batch_idx:08d}"


def latest_checkpoint(output: str, run: str | None = None) -> str | None:
    """URL of the newest COMPLETE checkpoint under ``{output}/ckpt`` (None when there is none); with ``run``
    only those written by that run."""
    root = io.join(output, "ckpt")
    for tag in sorted((t for t in io.listdir(root) if t.startswith("step-")), reverse=True):
        marker = io.join(root, tag, COMPLETE)
        if io.exists(marker) and (run is None or json.loads(io.read_bytes(marker)).get("run") == run):
            return io.join(root, tag)
    return None


def resolve_resume(cfg: Config) -> str | None:
    """``train.resume``: "" -> None, "auto" -> latest complete (or None), else that checkpoint URL."""
    resume = cfg.train.resume
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(cfg.train.output)
    url = resume.rstrip("/")
    if not io.exists(io.join(url, COMPLETE)):
        raise ConfigError(f"train.resume={resume}: not a complete checkpoint (no {COMPLETE} marker); "
                          f"expected a folder like {{output}}/ckpt/step-00000100")
    return url


def model_signature(cfg: Config) -> dict:
    """The settings that fix the trained modules' shapes: a resumed run must match them."""
    m = cfg.model
    return {"model.backbone": m.backbone, "model.code_dim": m.code_dim, "model.n_classes": m.n_classes,
            "model.extra_clusters": m.extra_clusters, "loss.lhp.enabled": cfg.loss.lhp.enabled}


def check_resume_config(cfg: Config, url: str) -> None:
    """Raise naming the checkpoint and the keys when it was written with other model settings."""
    saved = json.loads(io.read_bytes(io.join(url, COMPLETE))).get("model")
    if not saved:  # a marker from before the settings were recorded: DeepSpeed's shape checks remain
        return
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in model_signature(cfg).items()
            if saved.get(k) != v]
    if diff:
        raise ConfigError(f"train.resume: checkpoint {url} was written with other model settings ({'; '.join(diff)}); "
                          "resume with the same settings, or start a new train.output")


def _upload_tree(local: str, url: str) -> None:
    for dirpath, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), local)
            io.put_file(os.path.join(dirpath, name), io.join(url, *rel.split(os.sep)))


def save_checkpoint(engine, cfg: Config, world: World, batch_idx: int, client_state: dict, run: str = "") -> str:
    """Every rank saves its part; rank 0 writes the COMPLETE marker last. Returns the checkpoint URL."""
    root = io.join(cfg.train.output, "ckpt")
    tag = tag_name(batch_idx)
    if io.is_remote(root):
        stage = tempfile.mkdtemp(prefix="depthg-ckpt-")
        try:
            engine.save_checkpoint(stage, tag=tag, client_state=client_state, save_latest=False)
            _upload_tree(os.path.join(stage, tag), io.join(root, tag))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    else:
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    barrier(world)
    if world.is_main:  # the marker also records the model settings, checked on resume
        marker = {"batch": batch_idx, "model": model_signature(cfg), "run": run}
        io.write_bytes(io.join(root, tag, COMPLETE), json.dumps(marker).encode())
    barrier(world)
    return io.join(root, tag)


def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19's checkpoints of this trainer hold (fp32 / bf16, ZeRO 0 / 1): plain
    records (an int enum, a two-int dataclass, the loss scaler's state), allowed for ``weights_only`` loading."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler]


@contextlib.contextmanager
def safe_loads(engine):
    """While it lasts, the engine's checkpoint engine reads files with ``torch.load(weights_only=True)`` and only
    ``deepspeed_safe_globals`` allowed (DeepSpeed's own ``TorchCheckpointEngine.load`` unpickles anything)."""
    import torch

    ckpt_engine = engine.checkpoint_engine
    allowed = deepspeed_safe_globals()

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"train.resume: {path} holds objects other than tensors and DeepSpeed's checkpoint "
                                  f"records, refused unopened ({str(exc).splitlines()[0][:200]}); resume only from "
                                  "checkpoints this project wrote to your own storage") from None

    ckpt_engine.load = load  # an instance attribute shadows the method, for this load only
    try:
        yield
    finally:
        del ckpt_engine.load


def load_checkpoint(engine, url: str) -> dict:
    """Load module + optimizer state from a checkpoint URL (downloaded first if remote); client state."""
    url = url.rstrip("/")
    tag = url.rsplit("/", 1)[-1]
    stage = None
    if io.is_remote(url):
        stage = tempfile.mkdtemp(prefix="depthg-resume-")
        fs, path = io.filesystem(url)
        fs.get(path.rstrip("/") + "/", os.path.join(stage, tag) + "/", recursive=True)
        parent = stage
    else:
        parent = os.path.dirname(url)
    try:
        with safe_loads(engine):
            load_path, client = engine.load_checkpoint(parent, tag=tag, load_optimizer_states=True)
    finally:
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {url}")
    return client or {}


def write_final(cfg: Config, segmenter, total: int, finish: Callable | None = None) -> None:
    """Rank 0: ``segmenter_last.pt``, ``segmenter.pt`` (the selected one when ``train.select`` picked one,
    else the last) and ``config.yaml``. ``segmenter`` is an fp32 CPU copy. ``finish(segmenter) -> dict``
    (``train.finish``) refits the probes of each written segmenter first; what it fitted joins the metadata."""
    from depthg.checkpoint import load_segmenter, save_segmenter

    def finished(seg, meta: dict) -> dict:
        return {**meta, **(finish(seg) if finish is not None else {})}

    out = cfg.train.output
    last_meta = finished(segmenter, {"batch": total, "select": "none"})
    save_segmenter(io.join(out, "segmenter_last.pt"), cfg, segmenter, last_meta)
    best = io.join(out, "segmenter_best.pt")
    if cfg.train.select != "none" and io.exists(best):
        best_cfg, selected, meta = load_segmenter(best)
        save_segmenter(io.join(out, "segmenter.pt"), best_cfg, selected, finished(selected, meta))
    else:
        save_segmenter(io.join(out, "segmenter.pt"), cfg, segmenter, last_meta)
    save_config(cfg, io.join(out, "config.yaml"))
