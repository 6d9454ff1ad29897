"""The GPU training path as far as a CPU can build it: a bf16 DeepSpeed engine (ZeRO 0 and 1) built, stepped,
checkpointed and resumed by the real trainer, and ``segmenter*.pt`` written from the optimizer's fp32 master
weights, not from the bf16-rounded module the engine computes with. Also (issue 28): gradients communicated in
fp32 (the config, and two real gloo ranks), and the backbone's precision following the head's (fp32: no autocast).

Before: ``cluster.engine.fp32_copy`` upcast the bf16 module, so every saved weight was a bf16 value (8 bits of
mantissa), although DeepSpeed kept fp32 masters (``fp32_groups`` at ZeRO 0, partitioned at ZeRO 1).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from cluster import checkpoints, engine as engines
from depthg import shards
from depthg.checkpoint import load_segmenter
from depthg.config import load_config
from depthg.world import World

TINY = ["model.backbone=tiny_vit", "data.resolution=32", "model.code_dim=8", "sampling.samples=3",
        "sampling.min_samples=2", "loss.neg_rounds=2", "train.micro_batch_per_gpu=2", "train.log_every=1",
        "train.loader_workers=0", "train.shuffle_buffer=4", "train.precision=bf16", "train.finish=none",
        "train.lr=1e-2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    shards.write_test_shards(folder, 12, size=(32, 32), num_positives=2, samples_per_shard=3)
    return folder


def _train(root: str, output: str, *extra: str):
    from launch import train as launch_train

    return launch_train.main(["--launcher", "env", "--config", "none", f"shards.root={root}",
                              f"train.output={output}", *TINY, *extra])


def _rounded_to_bf16(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.bfloat16().float(), t))


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_engine_steps_checkpoints_resumes_and_saves_fp32_masters(root, tmp_path, stage):
    out = str(tmp_path / "run")
    _train(root, out, f"train.zero_stage={stage}", "train.num_batches=2", "train.ckpt_every=1")
    assert checkpoints.latest_checkpoint(out).endswith("step-00000002")
    _train(root, out, f"train.zero_stage={stage}", "train.num_batches=3", "train.ckpt_every=1", "--resume", "auto")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    assert [r["batch"] for r in rows if "total" in r] == [0, 1, 2]  # resumed at 2, nothing twice
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in rows if "total" in r)
    _, seg, meta = load_segmenter(os.path.join(out, "segmenter.pt"))
    assert meta["batch"] == 3
    weights = [p.detach() for p in seg.head.parameters()]
    assert all(p.dtype == torch.float32 for p in weights)
    # trained masters carry more than bf16's 8 mantissa bits; a bf16 module upcast never does
    assert not all(_rounded_to_bf16(p) for p in weights)


@pytest.mark.parametrize("stage", [0, 1])
def test_master_copy_is_the_optimizers_fp32_master_not_the_module(tmp_path, stage):
    from depthg.step import compute_losses

    cfg = load_config(None, [*TINY, f"train.zero_stage={stage}", "model.n_classes=3"])
    device = torch.device("cpu")
    backbone, segmenter = engines.build_models(cfg, device)
    engine, _ = engines.build_engine(cfg, World(), segmenter, device)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 32, 32), "pos_image": torch.rand(2, 3, 32, 32),
             "depth": torch.rand(2, 1, 32, 32), "pos_depth": torch.rand(2, 1, 32, 32),
             "label": torch.randint(0, 3, (2, 32, 32))}
    for step in range(2):
        out = compute_losses(backbone, engine.module, batch, cfg, step, gen)
        engine.backward(out["total"])
        engine.step()
    master = engines.master_copy(engine)
    module = dict(engine.module.named_parameters())
    differs = 0
    for name, param in master.named_parameters():
        assert param.dtype == torch.float32
        # the module is the master rounded to bf16
        assert torch.equal(param.detach().bfloat16(), module[name].detach()), name
        differs += int(not _rounded_to_bf16(param.detach()))
    assert differs > 0


# ----------------------------------------------------------------------------- gradient communication (issue 28.9)
def test_ds_config_communicates_gradients_in_fp32():
    """Before, the config had no ``communication_data_type``: DeepSpeed then reduces in the compute dtype (bf16)."""
    for stage in (0, 1):
        cfg = load_config(None, [*TINY, f"train.zero_stage={stage}"])
        assert engines.ds_config(cfg, World(rank=0, world_size=8), bf16=True)["communication_data_type"] == "fp32"


REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_reduce_coalesced")


def _reduce_dtypes_of_a_step(rank: int, port: int, out: str) -> None:
    """One rank of 2 (gloo): a bf16 engine at ZeRO 0 and at ZeRO 1, one step each; every reduction's dtype and size."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    seen = []
    for name in REDUCTIONS:  # DeepSpeed's torch backend looks these up on torch.distributed at each call
        original = getattr(dist, name)

        def record(*args, _name=name, _original=original, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple)) for t in a
                        if torch.is_tensor(t)]
            seen.extend({"op": _name, "dtype": str(t.dtype), "numel": t.numel()} for t in tensors)
            return _original(*args, **kwargs)

        setattr(dist, name, record)
    from depthg.models.heads import build_segmenter
    from depthg.step import losses_from_features

    world = World(rank=rank, world_size=2, local_rank=rank)
    device = torch.device("cpu")
    for stage in (0, 1):  # the step after the backbone (random features: no backbone to build)
        cfg = load_config(None, [*TINY, f"train.zero_stage={stage}", "model.n_classes=3"])
        segmenter = build_segmenter(cfg.model, 32, cfg.loss.lhp.enabled)
        engine, _ = engines.build_engine(cfg, world, segmenter, device)
        gen = torch.Generator().manual_seed(rank)
        feats, feats_pos = torch.randn(2, 32, 4, 4, generator=gen), torch.randn(2, 32, 4, 4, generator=gen)
        depth, pos_depth = torch.rand(2, 1, 32, 32, generator=gen), torch.rand(2, 1, 32, 32, generator=gen)
        seen.append({"stage": stage, "params": sum(p.numel() for p in segmenter.parameters() if p.requires_grad)})
        losses = losses_from_features(engine.module, feats, feats_pos, depth, pos_depth,
                                      torch.randint(0, 3, (2, 32, 32), generator=gen), cfg, 0, gen)
        engine.backward(losses["total"])
        engine.step()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(seen, fh)
    del engine
    from cluster.distributed import shutdown

    shutdown(world)  # as the trainer ends: groups freed and gloo's threads joined before exit (no abort at teardown)


def test_two_bf16_ranks_reduce_gradients_in_fp32(tmp_path):
    """Two real gloo processes: every gradient reduction of a bf16 engine (ZeRO 0 and 1) is fp32, none bf16."""
    import torch.multiprocessing as mp

    from cluster.distributed import free_port

    mp.spawn(_reduce_dtypes_of_a_step, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as fh:
            rows = json.load(fh)
        starts = [i for i, r in enumerate(rows) if "stage" in r] + [len(rows)]
        for a, b in zip(starts, starts[1:]):
            params, calls = rows[a]["params"], rows[a + 1:b]
            grads = [c for c in calls if c["numel"] >= params // 2]  # the gradient bucket (or its half at ZeRO 1)
            assert grads, (rows[a], calls)
            assert all(c["dtype"] == "torch.float32" for c in grads), (rows[a], grads)
            assert not any(c["dtype"] == "torch.bfloat16" for c in calls), (rows[a], calls)


# ----------------------------------------------------------------------------- the backbone's precision (issue 28.10)
def _backbone_forward_dtypes(head_dtype: torch.dtype, device: str = "cpu") -> set:
    """``(input dtype, output dtype, autocast on)`` of every Linear / Conv2d of the frozen backbone in one
    ``compute_losses`` with a head of ``head_dtype`` (the dtype a bf16 engine holds the module in)."""
    from depthg.models.backbones import build_backbone
    from depthg.models.heads import build_segmenter
    from depthg.step import compute_losses

    cfg = load_config(None, [*TINY, "model.n_classes=3"])
    backbone = build_backbone("tiny_vit", "random").to(device)
    segmenter = build_segmenter(cfg.model, backbone.dim, False).to(device, head_dtype)
    seen = set()

    def hook(module, inputs, output):
        seen.add((inputs[0].dtype, output.dtype, torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")))

    handles = [m.register_forward_hook(hook) for m in backbone.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    batch = {"image": torch.rand(2, 3, 32, 32), "pos_image": torch.rand(2, 3, 32, 32),
             "depth": torch.rand(2, 1, 32, 32), "pos_depth": torch.rand(2, 1, 32, 32),
             "label": torch.randint(0, 3, (2, 32, 32))}
    compute_losses(backbone, segmenter, batch, cfg, 0, torch.Generator().manual_seed(0))
    for handle in handles:
        handle.remove()
    assert seen
    return seen


def test_fp32_reaches_the_backbone_without_autocast_and_bf16_only_when_asked():
    """train.precision=fp32: every layer of the backbone computes in fp32 with autocast off (before: bf16 autocast
    on CUDA whatever the precision); a bf16 engine runs it under bf16 autocast on every device (before: CPU fp32)."""
    assert _backbone_forward_dtypes(torch.float32) == {(torch.float32, torch.float32, False)}
    assert {(out, on) for _, out, on in _backbone_forward_dtypes(torch.bfloat16)} == {(torch.bfloat16, True)}
    # the decision is the same on CUDA: the device never turns autocast on by itself
    from depthg.step import backbone_autocast

    assert backbone_autocast(torch.float32) is None and backbone_autocast(torch.bfloat16) is torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_on_cuda_reaches_the_backbone_without_autocast():
    assert _backbone_forward_dtypes(torch.float32, "cuda") == {(torch.float32, torch.float32, False)}
    assert {(out, on) for _, out, on in _backbone_forward_dtypes(torch.bfloat16, "cuda")} == {(torch.bfloat16, True)}


# ----------------------------------------------------------------------------- resume loads safely (issue 28.14)
class _RunsCode:
    """What a hostile checkpoint file could hold: unpickling it calls ``open(marker, "w")``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_refuses_a_checkpoint_whose_pickle_would_run_code(root, tmp_path):
    """Before, DeepSpeed's ``torch.load(weights_only=False)`` ran it while resuming (the marker file appeared);
    now the file is refused naming it, and nothing ran. Real checkpoints (fp32, bf16 at ZeRO 0 and 1) still
    resume: ``test_bf16_engine_steps_checkpoints_resumes_and_saves_fp32_masters`` above and test_trainer.py."""
    import shutil

    out = str(tmp_path / "run")
    _train(root, out, "train.precision=fp32", "train.num_batches=1")
    good = checkpoints.latest_checkpoint(out)
    bad = tmp_path / "bad" / "ckpt" / "step-00000001"
    shutil.copytree(good, bad)
    marker = tmp_path / "code-ran"
    state = torch.load(bad / "mp_rank_00_model_states.pt", weights_only=True)
    state["client_extra"] = _RunsCode(str(marker))
    torch.save(state, bad / "mp_rank_00_model_states.pt")
    from depthg.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"train\.resume: .*mp_rank_00_model_states\.pt holds objects other than "
                                              r"tensors .*your own storage"):
        _train(root, str(tmp_path / "resumed"), "train.precision=fp32", "train.num_batches=2", f"train.resume={bad}")
    assert not marker.exists()  # nothing of the file ran
