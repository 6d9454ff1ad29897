"""The training runtime: DeepSpeed engine, loop, checkpoints, logging, quick validation.

``train(cfg, world, on_checkpoint=None)`` runs the same loop under every launcher (torchrun,
``deepspeed --no_ssh``, Ray Train, a single process): the ``World`` comes from ``cluster.world.detect``.
The loop calls the pure step ``depthg.step.compute_losses`` and owns everything around it:

* DeepSpeed: the config is generated from the dataclass (``ds_config``: micro batch, accumulation,
  ``train_batch_size = micro * accum * world`` asserted, ZeRO 0/1, bf16 on GPU / fp32 on CPU). The
  optimizer is a torch Adam with two parameter groups (head lr, probes lr) handed to
  ``deepspeed.initialize``, not a DeepSpeed optimizer (FusedAdam would JIT-compile for minutes on CPU).
  On CPU the shared-memory comm op, which DeepSpeed would JIT-compile (~60 s) on first use, is
  switched off (``_skip_cpu_shm_op``; gloo does the all-reduce); ``DEPTHG_DS_SHM=1`` keeps it.
* Checkpoints: ``{output}/ckpt/step-NNNNNNNN/`` written by ``engine.save_checkpoint`` (each rank its
  files; for ``s3://`` outputs into a local staging folder, then uploaded through ``depthg.io``), then
  a ``COMPLETE`` marker written LAST by rank 0 after a barrier: only marked folders count
  (``latest_checkpoint``). The client state holds the batch index and the step generator state, so a
  resumed run continues with the same schedule values, random draws and data position (exact to the
  micro batch, see ``depthg.streaming``; needs the same world size and loader workers).
* Logging: ``RankZeroLog`` is the one gate for side effects; rank 0 writes tqdm (samples/s),
  TensorBoard events and ``{output}/metrics.jsonl`` (every loss term, lambda, b_depth, S, lr).
* Quick validation every ``train.val_every`` batches (``validate``): cluster-probe mIoU without CRF
  on a few val batches per rank (confusions summed across ranks) and the label-free criterion.
* End: rank 0 writes ``{output}/segmenter.pt`` (``depthg.checkpoint.save_segmenter``) and the
  resolved ``{output}/config.yaml``.

Label-free selection (``train.select=label_free``): the kept segmenter is the one with the lowest
held-out STEGO loss (self + kNN + negative terms, weighted, without the depth term) on the val shards.
Why this criterion: it is the training objective itself measured on data the head never trained on,
so it needs no labels; the depth term is left out because its weight and shift decay on a schedule,
which would make values from different batches incomparable; the cluster-probe loss is not used
because it rewards collapsed codes (all codes equal give a perfect k-means fit).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from depthg import io, streaming
from depthg.config import Config, save_config
from depthg.world import World

COMPLETE = "COMPLETE"


# ----------------------------------------------------------------------------- DeepSpeed config
def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


def ds_config(cfg: Config, world: World, bf16: bool) -> dict:
    """The DeepSpeed config generated from ``cfg.train`` (nothing is written twice)."""
    t = cfg.train
    global_batch = t.micro_batch_per_gpu * t.grad_accum * world.world_size
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_per_gpu,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": global_batch,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    assert config["train_batch_size"] == (config["train_micro_batch_size_per_gpu"]
                                          * config["gradient_accumulation_steps"] * world.world_size)
    return config


def _skip_cpu_shm_op() -> None:
    """Tell DeepSpeed the CPU shared-memory comm op is unavailable, so it is never JIT-built.

    DeepSpeed's CPU comm backend builds ``deepspeed_shm_comm`` (~60 s of g++) when it is listed as
    compatible; training all-reduces go through torch.distributed (gloo) anyway.
    """
    if os.environ.get("DEPTHG_DS_SHM") == "1":
        return
    import deepspeed.ops

    # ``deepspeed.ops.__compatible_ops__`` is computed lazily (it runs compiler probes for every op,
    # ~seconds) and read only by the comm backend's shm check (deepspeed 0.19). Seeding it before
    # first use skips the probes; an already probed dict is edited in place.
    ops = vars(deepspeed.ops).setdefault("__compatible_ops__", {})
    ops["deepspeed_shm_comm"] = False


def build_engine(cfg: Config, world: World, segmenter: torch.nn.Module, device: torch.device):
    """``(engine, optimizer)``: torch Adam (head lr, probes lr) wrapped by ``deepspeed.initialize``."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_shm_op()
    import deepspeed

    if not torch.distributed.is_initialized():
        if not world.distributed:  # a single process still needs a (1-rank) process group for DeepSpeed
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())),
                               ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    segmenter.to(device)
    optimizer = torch.optim.Adam([
        {"params": segmenter.head_parameters(), "lr": cfg.train.lr, "name": "head"},
        {"params": segmenter.probe_parameters(), "lr": cfg.train.probe_lr, "name": "probes"},
    ])
    engine, optimizer, _, _ = deepspeed.initialize(
        model=segmenter, optimizer=optimizer, config=ds_config(cfg, world, use_bf16(cfg, device)),
        dist_init_required=False if torch.distributed.is_initialized() else None)
    return engine, optimizer


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- cross-rank helpers
def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place); identity in a single process."""
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def barrier(world: World) -> None:
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------- logging gate
class RankZeroLog:
    """Every rank-0-only side effect of training goes through here; other ranks get no-ops."""

    def __init__(self, cfg: Config, world: World, total: int, start: int):
        self.enabled, self.output = world.is_main, cfg.train.output
        self.local = self.output if not io.is_remote(self.output) else tempfile.mkdtemp(prefix="depthg-log-")
        self.samples_per_batch = cfg.train.micro_batch_per_gpu * cfg.train.grad_accum * world.world_size
        self.bar = self.writer = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        os.makedirs(self.local, exist_ok=True)
        self._keep_history(start)
        self.writer = SummaryWriter(os.path.join(self.local, "tb"))
        self.bar = tqdm(total=total, initial=start, desc="train", unit="batch", dynamic_ncols=True)
        self.t0, self.n0 = time.time(), start

    def _keep_history(self, start: int) -> None:
        """metrics.jsonl keeps the rows of batches before ``start`` (a resumed run continues it)."""
        url, path = io.join(self.output, "metrics.jsonl"), os.path.join(self.local, "metrics.jsonl")
        rows = []
        if start > 0 and io.exists(url):
            rows = [r for r in io.read_bytes(url).decode().splitlines() if r.strip() and json.loads(r)["batch"] < start]
        with open(path, "w") as fh:
            fh.writelines(r + "\n" for r in rows)

    def metrics(self, batch_idx: int, values: dict) -> None:
        if not self.enabled:
            return
        rate = (batch_idx + 1 - self.n0) * self.samples_per_batch / max(time.time() - self.t0, 1e-9)
        values = {**values, "samples_per_s": rate}
        for key, value in values.items():
            self.writer.add_scalar(key.replace(".", "/"), value, batch_idx)
        with open(os.path.join(self.local, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps({"batch": batch_idx, **values}) + "\n")
        if "total" in values:
            self.bar.set_postfix(loss=f"{values['total']:.4f}", sps=f"{rate:.1f}")

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def flush(self) -> None:
        """Push metrics.jsonl and TensorBoard files to a remote output (local outputs are live)."""
        if not self.enabled:
            return
        self.writer.flush()
        if io.is_remote(self.output):
            for dirpath, _, files in os.walk(self.local):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), self.local)
                    io.put_file(os.path.join(dirpath, name), io.join(self.output, *rel.split(os.sep)))

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.writer.close()
            self.bar.close()


# ----------------------------------------------------------------------------- checkpoints
def tag_name(batch_idx: int) -> str:
    return f"step-{batch_idx:08d}"


def latest_checkpoint(output: str) -> str | None:
    """URL of the newest COMPLETE checkpoint under ``{output}/ckpt`` (None when there is none)."""
    root = io.join(output, "ckpt")
    tags = [t for t in io.listdir(root) if t.startswith("step-") and io.exists(io.join(root, t, COMPLETE))]
    return io.join(root, max(tags)) if tags else None


def resolve_resume(cfg: Config) -> str | None:
    """``train.resume``: "" -> None, "auto" -> latest complete (or None), else that checkpoint URL."""
    resume = cfg.train.resume
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(cfg.train.output)
    url = resume.rstrip("/")
    if not io.exists(io.join(url, COMPLETE)):
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no {COMPLETE} marker); "
                                f"expected a folder like {{output}}/ckpt/step-00000100")
    return url


def save_checkpoint(engine, cfg: Config, world: World, batch_idx: int, client_state: dict) -> str:
    """Every rank saves its part; rank 0 writes the COMPLETE marker last. Returns the checkpoint URL."""
    root = io.join(cfg.train.output, "ckpt")
    tag = tag_name(batch_idx)
    if io.is_remote(root):
        stage = tempfile.mkdtemp(prefix="depthg-ckpt-")
        try:
            engine.save_checkpoint(stage, tag=tag, client_state=client_state, save_latest=False)
            for dirpath, _, files in os.walk(os.path.join(stage, tag)):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), os.path.join(stage, tag))
                    io.put_file(os.path.join(dirpath, name), io.join(root, tag, *rel.split(os.sep)))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    else:
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    barrier(world)
    if world.is_main:  # the marker also records the model settings, checked on resume
        marker = {"batch": batch_idx, "model": model_signature(cfg)}
        io.write_bytes(io.join(root, tag, COMPLETE), json.dumps(marker).encode())
    barrier(world)
    return io.join(root, tag)


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
        raise ValueError(f"train.resume: checkpoint {url} was written with other model settings ({'; '.join(diff)}); "
                         "resume with the same settings, or start a new train.output")


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
        load_path, client = engine.load_checkpoint(parent, tag=tag, load_optimizer_states=True)
    finally:
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {url}")
    return client or {}


# ----------------------------------------------------------------------------- validation
def _val_spec(cfg: Config, world: World, batches: int):
    """The val split (mined ``{root}/val``, else depth ``{root}/depth/val`` with the crop as positive)."""
    kw = dict(rank=world.rank, world_size=world.world_size, micro_batch=cfg.train.micro_batch_per_gpu,
              resolution=cfg.data.resolution, shuffle_buffer=0, seed=cfg.train.seed)
    try:
        spec, _ = streaming.open_split(cfg.shards.root, "val", **kw)
    except FileNotFoundError:
        spec, _ = streaming.open_split(io.join(cfg.shards.root, "depth"), "val", **kw)
    spec.num_steps = min(batches, spec.steps_per_epoch)
    return spec


def validate(backbone, segmenter, cfg: Config, world: World, batches: int = 4) -> dict:
    """Quick validation: cluster-probe mIoU (no CRF) and the held-out STEGO loss, over all ranks."""
    from depthg import evaluation, metrics
    from depthg.step import compute_losses

    spec = _val_spec(cfg, world, batches)
    n_pred, n_cls = segmenter.n_clusters, segmenter.n_classes
    conf = torch.zeros(n_pred, n_cls, dtype=torch.float64)
    sums = torch.zeros(2, dtype=torch.float64)  # STEGO loss sum, batches
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.train.seed, world.rank, 99]).generate_state(1)[0]))
    with torch.no_grad():
        for batch in streaming.make_loader(spec, 0):
            out = compute_losses(backbone, segmenter, batch, cfg, 0, gen, training=False)
            labels = batch["label"]
            scores = evaluation.probe_scores(segmenter, out["codes"], labels.shape[-2:], ("cluster",))
            pred = scores["cluster"].argmax(dim=1).cpu()
            conf += torch.from_numpy(metrics.confusion(pred.numpy(), labels.numpy(), n_pred, n_cls)).double()
            sums += torch.tensor([float(out["stego"]), 1.0], dtype=torch.float64)
    all_reduce_sum(conf, world)
    all_reduce_sum(sums, world)
    scores = metrics.hungarian_scores(conf.long().numpy())
    return {"val/miou": float(scores["miou"]), "val/accuracy": float(scores["accuracy"]),
            "val/stego": float(sums[0] / sums[1].clamp(min=1))}


# ----------------------------------------------------------------------------- the loop
def _device(world: World) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def build_models(cfg: Config, n_classes: int, device: torch.device):
    """Frozen backbone (outside the engine) and the trainable Segmenter, seeded by train.seed."""
    from depthg.models.backbones import build_backbone
    from depthg.models.heads import build_segmenter

    backbone = build_backbone(cfg.model.backbone, cfg.model.weights).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        segmenter = build_segmenter(cfg.model, backbone.dim, cfg.loss.lhp.enabled)
    return backbone, segmenter


def _trace_samples(world: World, batch_idx: int, batch: dict) -> None:
    """Debug aid: with DEPTHG_TRACE_SAMPLES=folder every rank appends the sample ids it trains on
    to ``folder/rank{R}.jsonl`` (tests use it to prove the ranks see disjoint samples)."""
    folder = os.environ.get("DEPTHG_TRACE_SAMPLES")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{world.rank}.jsonl"), "a") as fh:
            fh.write(json.dumps({"batch": batch_idx, "step": int(batch.get("step", -1)), "ids": batch["id"]}) + "\n")


def _inject_failure(world: World, batch_idx: int) -> None:
    """Fault injection for recovery tests: DEPTHG_FAIL_ONCE="rank:batch:marker" makes that rank raise
    once at that batch (the marker file records that it already failed); with DEPTHG_FAIL_SIGNAL=KILL
    the process SIGKILLs itself instead (dies like an OOM-killed worker: no exception, no cleanup)."""
    spec = os.environ.get("DEPTHG_FAIL_ONCE")
    if spec:
        rank, batch, marker = spec.split(":", 2)
        if int(rank) == world.rank and int(batch) == batch_idx and not os.path.exists(marker):
            open(marker, "w").close()
            if os.environ.get("DEPTHG_FAIL_SIGNAL") == "KILL":
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure on rank {rank} at batch {batch}")


def stop_if_not_finite(out: dict, cfg: Config, world: World, batch_idx: int, log: "RankZeroLog") -> None:
    """Stop training on a NaN / inf loss on any rank (all ranks agree, so none waits in a collective);
    the message names the last good checkpoint, and nothing is written after it."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(out["total"].detach()).all()) else 1.0], dtype=torch.float64)
    all_reduce_sum(bad, world)
    if bad.item() == 0:
        return
    terms = sorted(k for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0 and not torch.isfinite(v))
    last = latest_checkpoint(cfg.train.output)
    message = (f"non-finite loss at batch {batch_idx} on {int(bad.item())} rank(s) (terms on this rank: "
               f"{', '.join(terms) or 'all finite'}); "
               f"training stopped. Last good checkpoint: {last or 'none yet'}. Lower train.lr / train.probe_lr "
               "(or check the data) and restart with train.resume=auto")
    log.print(message)
    log.close()
    raise FloatingPointError(message)


def _scalars(out: dict) -> dict:
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v)
            for k, v in out.items() if not torch.is_tensor(v) or v.dim() == 0}


def _mean_over_ranks(values: dict, world: World) -> dict:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    all_reduce_sum(t, world)
    return {k: float(v) / world.world_size for k, v in zip(keys, t)}


def prepare(cfg: Config, world: World):
    """Resolve n_classes from the train manifest; returns (cfg, train StreamSpec)."""
    import dataclasses

    spec, manifest = streaming.open_split(
        cfg.shards.root, "train", rank=world.rank, world_size=world.world_size,
        micro_batch=cfg.train.micro_batch_per_gpu, grad_accum=cfg.train.grad_accum,
        resolution=cfg.data.resolution, shuffle_buffer=cfg.train.shuffle_buffer, seed=cfg.train.seed)
    if cfg.model.n_classes == 0:
        n_classes = int(manifest.get("n_classes") or 0)
        if n_classes < 1:
            raise ValueError(f"model.n_classes=0 and the manifest of {cfg.shards.root}/train has no n_classes")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_classes=n_classes))
    return cfg, spec


def train(cfg: Config, world: World, on_checkpoint: Callable[[str, int, dict], None] | None = None) -> dict:
    """Run (or resume) training; returns the last logged metrics. Same code on every rank."""
    from depthg.step import compute_losses

    device = _device(world)
    cfg, spec = prepare(cfg, world)
    backbone, segmenter = build_models(cfg, cfg.model.n_classes, device)
    engine, optimizer = build_engine(cfg, world, segmenter, device)
    gen = torch.Generator().manual_seed(_seed(cfg.train.seed, world.rank, 1))
    start, best = 0, {"val/stego": float("inf")}
    resume = resolve_resume(cfg)
    if resume:
        check_resume_config(cfg, resume)
        state = load_checkpoint(engine, resume)
        start, best = int(state["batch_idx"]), state.get("best", best)
        gen.set_state(state["generator"])
    accum, total = cfg.train.grad_accum, cfg.train.num_batches
    log = RankZeroLog(cfg, world, total, start)
    log.print(f"world {world}: {spec.steps_per_epoch // accum} batches/epoch, start at batch {start}"
              + (f" (resumed from {resume})" if resume else ""))
    if world.is_main:
        save_config(cfg, io.join(cfg.train.output, "config.yaml"))
    last: dict = {}
    if start < total:
        spec.start_step, spec.num_steps = start * accum, (total - start) * accum
        acc: dict = {}
        skipped = 0  # damaged shards / samples met by this rank's loader (depthg.streaming.shard_samples)
        for micro, batch in enumerate(streaming.make_loader(spec, cfg.train.loader_workers)):
            batch_idx = start + micro // accum
            _trace_samples(world, batch_idx, batch)
            _inject_failure(world, batch_idx)
            skipped += int(batch.get("skipped", 0))
            out = compute_losses(backbone, engine.module, batch, cfg, batch_idx, gen)
            stop_if_not_finite(out, cfg, world, batch_idx, log)
            engine.backward(out["total"])
            engine.step()
            for k, v in _scalars(out).items():
                acc[k] = acc.get(k, 0.0) + v / accum
            if (micro + 1) % accum:
                continue
            done = batch_idx + 1
            log.advance()
            if done % cfg.train.log_every == 0 or done == total:
                acc.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)})
                acc["data/skipped_shards"] = float(skipped * world.world_size)  # the mean over ranks = the sum
                last = _mean_over_ranks(acc, world)
                log.metrics(batch_idx, last)
            acc = {}
            if cfg.train.val_every and (done % cfg.train.val_every == 0 or done == total):
                best = _validate_and_select(backbone, engine.module, cfg, world, log, batch_idx, best)
            if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or done == total:
                state = {"batch_idx": done, "generator": gen.get_state(), "best": best}
                url = save_checkpoint(engine, cfg, world, done, state)
                log.flush()
                if on_checkpoint is not None:
                    on_checkpoint(url, done, last)
    if world.is_main:
        _write_final(cfg, engine.module, best, total)
    log.close()
    barrier(world)
    return last


def _validate_and_select(backbone, segmenter, cfg, world, log, batch_idx, best) -> dict:
    scores = validate(backbone, segmenter, cfg, world)
    log.metrics(batch_idx, scores)
    log.print(f"batch {batch_idx + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    if cfg.train.select == "label_free" and scores["val/stego"] < best["val/stego"]:
        best = {**scores, "batch": batch_idx + 1}
        if world.is_main:
            from depthg.checkpoint import save_segmenter

            save_segmenter(io.join(cfg.train.output, "segmenter_best.pt"), cfg, _fp32(segmenter),
                           {"batch": batch_idx + 1, "select": "label_free", **scores})
    return best


def _fp32(module: torch.nn.Module) -> torch.nn.Module:
    """An fp32 CPU copy for saving (a bf16 engine trains bf16 weights; evaluation wants fp32)."""
    import copy

    return copy.deepcopy(module).float().cpu()


def _write_final(cfg: Config, segmenter, best: dict, total: int) -> None:
    """Rank 0: ``segmenter.pt`` (the label-free pick when selecting, else the last) + config.yaml."""
    from depthg.checkpoint import save_segmenter

    out, segmenter = cfg.train.output, _fp32(segmenter)
    save_segmenter(io.join(out, "segmenter_last.pt"), cfg, segmenter, {"batch": total})
    if cfg.train.select == "label_free" and io.exists(io.join(out, "segmenter_best.pt")):
        io.write_bytes(io.join(out, "segmenter.pt"), io.read_bytes(io.join(out, "segmenter_best.pt")))
    else:
        save_segmenter(io.join(out, "segmenter.pt"), cfg, segmenter, {"batch": total})
    save_config(cfg, io.join(out, "config.yaml"))
