"""The training loop: the same code on every rank, under every launcher.

``train(cfg, world, on_checkpoint=None, hooks=None)`` runs (or resumes) training under torchrun,
``deepspeed --no_ssh``, Ray Train or a single process; the ``World`` comes from ``cluster.world.detect``.
The loop calls the pure step ``depthg.step.compute_losses``; the rooms around it:

* ``cluster.engine``: models, DeepSpeed config and engine, the process group (``cpu:gloo,cuda:nccl`` on GPUs);
* ``cluster.distributed``: the collectives (valid under NCCL), the device picker, free ports;
* ``cluster.checkpoints``: ``{output}/ckpt/step-NNNNNNNN/`` + ``COMPLETE`` marker, resume, final files;
* ``cluster.runlog``: rank-0 logging (tqdm, TensorBoard, ``metrics.jsonl``);
* ``cluster.validation``: whole-split validation and the checkpoint choice (``train.select``);
* ``cluster.finish``: ``train.finish=fit``, the probes of ``segmenter.pt`` refitted on the final codes;
* ``cluster.preflight``: the checks that run in the launching process before any worker starts.

The data position is the local micro-batch index: a resumed run continues with the same schedule values,
random draws and samples (``depthg.streaming``; same world size and loader workers). A non-finite loss on
any rank stops every rank (the flag is all-reduced each micro batch) naming the last good checkpoint.

``hooks`` (a ``Hooks``) lets tests and debugging watch or disturb the loop without environment variables:
``on_start(world)`` once the engine exists, ``on_batch(world, batch_idx, batch)`` before each micro batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from cluster import checkpoints, distributed, engine as engines
from cluster.finish import finish
from cluster.runlog import RankZeroLog
from cluster.validation import validate_and_select
from depthg import io, streaming
from depthg.config import Config, ConfigError, save_config
from depthg.world import World

STEP_STREAM = 1  # the step generator's stream (dropout masks, sampling, negatives) of (seed, rank)


class Hooks:
    """Called by ``train`` on every rank; the base class does nothing. Subclass to trace or inject faults."""

    def on_start(self, world: World) -> None:
        pass

    def on_batch(self, world: World, batch_idx: int, batch: dict) -> None:
        pass


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def prepare(cfg: Config, world: World):
    """Resolve n_classes from the train manifest; returns (cfg, train StreamSpec)."""
    spec, manifest = streaming.open_split(
        cfg.shards.root, "train", rank=world.rank, world_size=world.world_size,
        micro_batch=cfg.train.micro_batch_per_gpu, grad_accum=cfg.train.grad_accum,
        resolution=cfg.data.resolution, shuffle_buffer=cfg.train.shuffle_buffer, seed=cfg.train.seed)
    if cfg.model.n_classes == 0:
        n_classes = int(manifest.get("n_classes") or 0)
        if n_classes < 1:
            raise ConfigError(f"model.n_classes=0 and the manifest of {cfg.shards.root}/train has no n_classes")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_classes=n_classes))
    return cfg, spec


def host_scalars(out: dict) -> dict[str, float]:
    """Every scalar term of a micro batch as a Python float through ONE device-to-host copy: the loop's only
    host sync per micro batch (a ``float()`` per term would stall the GPU once per term)."""
    keys = [k for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0]
    values = torch.stack([out[k].detach().float() for k in keys]).cpu().tolist() if keys else []
    numbers = {k: float(v) for k, v in out.items() if not torch.is_tensor(v) and isinstance(v, (int, float))}
    return {**numbers, **dict(zip(keys, values))}


def stop_if_not_finite(scalars: dict, cfg: Config, world: World, batch_idx: int, log: RankZeroLog) -> None:
    """Stop training on a NaN / inf loss on any rank (all ranks agree, so none waits in a collective);
    the message names the last good checkpoint, and nothing is written after it. ``scalars``: ``host_scalars``."""
    bad = distributed.count_over_ranks(not math.isfinite(scalars["total"]), world)
    if bad == 0:
        return
    terms = sorted(k for k, v in scalars.items() if not math.isfinite(v))
    last = checkpoints.latest_checkpoint(cfg.train.output)
    message = (f"non-finite loss at batch {batch_idx} on {bad} rank(s) (terms on this rank: "
               f"{', '.join(terms) or 'all finite'}); "
               f"training stopped. Last good checkpoint: {last or 'none yet'}. Lower train.lr / train.probe_lr "
               "(or check the data) and restart with train.resume=auto")
    log.print(message)
    log.close()
    raise FloatingPointError(message)


def _resume(cfg: Config, engine, gen: torch.Generator, run: str) -> tuple[int, dict, str | None]:
    """``(start batch, best scores, checkpoint URL)``; loads the checkpoint when there is one to resume:
    the newest of this ``run`` (a restarted group), else ``train.resume``."""
    url = (checkpoints.latest_checkpoint(cfg.train.output, run) if run else None) or checkpoints.resolve_resume(cfg)
    if not url:
        return 0, {}, None
    checkpoints.check_resume_config(cfg, url)
    state = checkpoints.load_checkpoint(engine, url)
    gen.set_state(state["generator"])
    return int(state["batch_idx"]), state.get("best", {}), url


def train(cfg: Config, world: World, on_checkpoint: Callable[[str, int, dict], None] | None = None,
          hooks: Hooks | None = None, run: str = "") -> dict:
    """Run (or resume) training; returns the last logged metrics. Same code on every rank. ``run``: an id
    shared by the restarts of one launch (``cluster.ray_train``); a restart resumes from its newest checkpoint."""
    from depthg.step import compute_losses

    hooks = hooks or Hooks()
    device = distributed.pick_device(world)
    workers = distributed.loader_workers(cfg.train.loader_workers, world)
    cfg, spec = prepare(cfg, world)
    backbone, segmenter = engines.build_models(cfg, device)
    engine, optimizer = engines.build_engine(cfg, world, segmenter, device)
    gen = torch.Generator().manual_seed(_seed(cfg.train.seed, world.rank, STEP_STREAM))
    start, best, resume = _resume(cfg, engine, gen, run)
    accum, total = cfg.train.grad_accum, cfg.train.num_batches
    log = RankZeroLog(cfg, world, total, start)
    log.print(f"world {world}: {spec.total / engines.global_batch(cfg, world):.1f} batches/epoch, "
              f"{workers} loader worker(s) per rank, start at batch {start}"
              + (f" (resumed from {resume})" if resume else ""))
    if world.is_main:
        save_config(cfg, io.join(cfg.train.output, "config.yaml"))
    hooks.on_start(world)
    last: dict = {}
    spec.start_step, spec.num_steps = start * accum, (total - start) * accum
    acc: dict = {}
    data = {"skipped": 0, "bytes": 0, "samples": 0}  # this rank's loader counters since the last log
    loader = streaming.make_loader(spec, workers, pin_memory=device.type == "cuda") if start < total else ()
    for micro, batch in enumerate(loader):
        batch_idx = start + micro // accum
        hooks.on_batch(world, batch_idx, batch)
        for key in ("skipped", "bytes"):
            data[key] += int(batch.get(key, 0))
        data["samples"] += len(batch["id"])
        out = compute_losses(backbone, engine.module, batch, cfg, batch_idx, gen)
        scalars = host_scalars(out)
        stop_if_not_finite(scalars, cfg, world, batch_idx, log)
        engine.backward(out["total"])
        engine.step()
        for k, v in scalars.items():
            acc[k] = acc.get(k, 0.0) + v / accum
        if (micro + 1) % accum:
            continue
        done = batch_idx + 1
        log.advance()
        if done % cfg.train.log_every == 0 or done == total:
            acc.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)})
            acc["data/skipped_shards"] = float(data["skipped"] * world.world_size)  # the mean over ranks = the sum
            acc["data/read_bytes_per_sample"] = data["bytes"] / max(1, data["samples"])
            last = distributed.mean_over_ranks(acc, world)
            log.metrics(batch_idx, last)
            data = {"skipped": data["skipped"], "bytes": 0, "samples": 0}
        acc = {}
        if cfg.train.val_every and (done % cfg.train.val_every == 0 or done == total):
            best = validate_and_select(backbone, engine, cfg, world, log, batch_idx, best)
        if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or done == total:
            state = {"batch_idx": done, "generator": gen.get_state(), "best": best}
            url = checkpoints.save_checkpoint(engine, cfg, world, done, state, run)
            log.flush()
            if on_checkpoint is not None:
                on_checkpoint(url, done, last)
    if start >= total and resume and on_checkpoint is not None:
        # a restarted group that finds the last checkpoint already written (the group before died after writing
        # it, before Ray registered its report) reports it again, so Ray's result names the final checkpoint
        on_checkpoint(resume, total, last)
    final = engines.master_copy(engine)  # every rank (ZeRO 1 gathers the fp32 masters)
    if world.is_main:  # train.finish: the written segmenters' probes refitted on their final codes
        checkpoints.write_final(cfg, final, total, lambda seg: finish(backbone, seg, cfg, spec, log))
    log.close()
    distributed.shutdown(world)  # a barrier, then the process groups ended before this rank's interpreter exits
    return last
