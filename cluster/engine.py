"""The models and the DeepSpeed engine of a training rank.

* ``ds_config``: the DeepSpeed config generated from ``cfg.train`` (micro batch, accumulation,
  ``train_batch_size = global_batch(cfg, world)``, ZeRO 0/1, bf16 or fp32 (``use_bf16``), gradient
  communication in fp32 always: ``communication_data_type``); nothing is written twice.
* ``build_engine``: a torch Adam with two parameter groups (head lr, probes lr) handed to
  ``deepspeed.initialize``, not a DeepSpeed optimizer (FusedAdam would JIT-compile for minutes on CPU).
  The process group is created here when the launcher has not made one (torchrun, ``deepspeed``, a single
  process, with a loopback rendezvous whose variables do not outlive the build) with
  ``cluster.distributed.process_group_backend``: ``cpu:gloo,cuda:nccl`` on GPUs. On CPU the
  shared-memory comm op, which DeepSpeed would JIT-compile (~60 s) on first use, is switched off
  (``_skip_cpu_shm_op``; gloo does the all-reduce); ``DEPTHG_DS_SHM=1`` keeps it.
* ``build_models``: the frozen backbone (outside the engine) and the trainable segmenter, seeded.
* ``master_copy``: the fp32 master weights (not the bf16 module) as a CPU module, for ``segmenter*.pt``.
"""
from __future__ import annotations

import copy
import os

import torch

from cluster.distributed import free_port, process_group_backend
from cluster.world import patched_environ
from depthg.config import Config
from depthg.world import World


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """``train.precision``: ``fp32`` (the default, the reference's precision) never; ``bf16`` always; ``auto`` on
    CUDA. The engine's dtype is the whole step's: the backbone follows the head (``depthg.step.backbone_autocast``)."""
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


def global_batch(cfg: Config, world: World) -> int:
    """Samples per optimizer step over all ranks: micro batch x accumulation x world size."""
    return cfg.train.micro_batch_per_gpu * cfg.train.grad_accum * world.world_size


def ds_config(cfg: Config, world: World, bf16: bool) -> dict:
    """The DeepSpeed config generated from ``cfg.train``."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_per_gpu,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": global_batch(cfg, world),
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        # gradients are all-reduced (ZeRO 1: reduce-scattered) in fp32 whatever the compute precision: DeepSpeed's
        # default is the compute dtype, which would sum bf16 gradients over the ranks (8 mantissa bits)
        "communication_data_type": "fp32",
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


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


def _launcher_env(world: World):
    """A single process still needs a 1-rank group and the launcher variables DeepSpeed reads (LOCAL_RANK,
    a loopback rendezvous on a free port): set while the engine is built, removed afterwards, so that they
    do not leak into processes started later from this one (a launcher would take them for its own)."""
    added = {}
    if not world.distributed:
        added = {key: value for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                 ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")) if key not in os.environ}
    return patched_environ(added)


def start_process_group(world: World, device: torch.device, backend: str | None = None) -> None:
    """Create the process group through DeepSpeed unless the launcher made one (Ray Train does).
    ``backend`` defaults to ``process_group_backend(device.type)``."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_shm_op()
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend or process_group_backend(device.type))


def build_engine(cfg: Config, world: World, segmenter: torch.nn.Module, device: torch.device):
    """``(engine, optimizer)``: torch Adam (head lr, probes lr) wrapped by ``deepspeed.initialize``."""
    with _launcher_env(world):
        start_process_group(world, device)
        import deepspeed

        segmenter.to(device)
        optimizer = torch.optim.Adam([
            {"params": segmenter.head_parameters(), "lr": cfg.train.lr, "name": "head"},
            {"params": segmenter.probe_parameters(), "lr": cfg.train.probe_lr, "name": "probes"},
        ])
        engine, optimizer, _, _ = deepspeed.initialize(
            model=segmenter, optimizer=optimizer, config=ds_config(cfg, world, use_bf16(cfg, device)),
            dist_init_required=False)
    return engine, optimizer


def build_models(cfg: Config, device: torch.device):
    """Frozen backbone (outside the engine) and the trainable Segmenter, seeded by train.seed."""
    from depthg.models.backbones import build_backbone
    from depthg.models.heads import build_segmenter

    backbone = build_backbone(cfg.model.backbone, cfg.model.weights).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        segmenter = build_segmenter(cfg.model, backbone.dim, cfg.loss.lhp.enabled)
    return backbone, segmenter


def _optimizer_masters(optimizer) -> dict[int, torch.Tensor]:
    """``{id(module parameter): fp32 master}`` of DeepSpeed's low-precision optimizer without ZeRO (bf16 +
    ZeRO 0 trains the module's bf16 weights with fp32 copies in ``fp32_groups``, one per ``fp16_groups`` entry)."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not low or not high:
        return {}
    return {id(lo): hi for lo_group, hi_group in zip(low, high) for lo, hi in zip(lo_group, hi_group)}


def master_copy(engine) -> torch.nn.Module:
    """An fp32 CPU copy of the engine's module holding the optimizer's fp32 MASTER weights, not the bf16-rounded
    module (what a bf16 engine computes with). Call on EVERY rank in the same order: with ZeRO 1 the masters
    are sharded and ``safe_get_full_fp32_param`` gathers each one (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    copy_ = copy.deepcopy(engine.module).float().cpu()
    masters = _optimizer_masters(engine.optimizer)
    for name, param in engine.module.named_parameters():
        full = masters.get(id(param))
        if full is None and param.requires_grad:
            full = safe_get_full_fp32_param(param)  # ZeRO's partitioned masters; None for a plain fp32 optimizer
        if full is not None:
            copy_.get_parameter(name).data.copy_(full.detach().float().cpu().view_as(param))
    return copy_
