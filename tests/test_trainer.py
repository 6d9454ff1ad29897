"""The training runtime: World detection, the generated DeepSpeed config, and real runs (one process,
2 gloo workers under torchrun via ``launch/train.py``, Ray Train with 2 CPU workers on moto S3), incl.
resume that ends at the same step, schedule values and weights as an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from ray import cloudpickle

import train_hooks

from cluster import checkpoints, distributed, engine
from cluster.world import detect
from depthg import io, shards
from depthg.config import ConfigError, load_config
from depthg.world import World

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS_SCRIPT = os.path.join(REPO, "tests", "train_hooks.py")
cloudpickle.register_pickle_by_value(train_hooks)  # Ray workers get the hook classes by value


# ----------------------------------------------------------------------------- World
def test_detect_launchers():
    assert detect({}) == World()
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    assert detect(torchrun) == World(rank=5, world_size=8, local_rank=1, node=1, num_nodes=2)
    deepspeed = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "9", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
                 "CROSS_SIZE": "2"}
    assert detect(deepspeed, local_rank=1) == World(rank=3, world_size=4, local_rank=1, node=1, num_nodes=2)
    ray = {"RANK": "2", "WORLD_SIZE": "6", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1"}
    assert detect(ray) == World(rank=2, world_size=6, local_rank=0, node=1, num_nodes=3)
    assert detect({"RANK": "1", "WORLD_SIZE": "2"}) == World(rank=1, world_size=2, local_rank=1, node=0)
    with pytest.raises(ValueError, match="RANK"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 2 outside"):
        World(rank=2, world_size=2)


# ----------------------------------------------------------------------------- DeepSpeed config
@pytest.mark.parametrize("micro,accum,world,zero,bf16", [(32, 1, 1, 0, False), (8, 4, 16, 1, True), (3, 2, 2, 0, False)])
def test_ds_config_matches_the_dataclass(micro, accum, world, zero, bf16):
    cfg = load_config(None, [f"train.micro_batch_per_gpu={micro}", f"train.grad_accum={accum}",
                             f"train.zero_stage={zero}"])
    ds = engine.ds_config(cfg, World(rank=0, world_size=world), bf16)
    assert ds["train_micro_batch_size_per_gpu"] == micro and ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == micro * accum * world
    assert ds["zero_optimization"] == {"stage": zero}
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is False
    assert "optimizer" not in ds  # a torch Adam is passed instead (no FusedAdam JIT)


def test_precision_is_fp32_unless_bf16_is_asked_for():
    """Issue 28.10: the reference trains in fp32; bf16 is an explicit speed setting. Before, the default (auto) made
    the engine bf16 on every GPU, the paper configs included."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not engine.use_bf16(load_config(None, []), cuda) and not engine.use_bf16(load_config(None, []), cpu)
    auto = load_config(None, ["train.precision=auto"])
    assert engine.use_bf16(auto, cuda) and not engine.use_bf16(auto, cpu)
    assert engine.use_bf16(load_config(None, ["train.precision=bf16"]), cpu)
    paper = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.startswith(("coco", "cityscapes", "potsdam")))
    assert len(paper) == 10
    for name in paper:  # every config that quotes a paper number, and its _paper sibling
        assert not engine.use_bf16(load_config(os.path.join(REPO, "configs", name)), cuda), name


def test_latest_checkpoint_needs_the_marker(tmp_path):
    out = str(tmp_path)
    for step, complete, run in ((2, True, "a"), (4, True, "b"), (6, False, "a")):
        folder = tmp_path / "ckpt" / checkpoints.tag_name(step)
        folder.mkdir(parents=True)
        if complete:
            (folder / checkpoints.COMPLETE).write_text(json.dumps({"batch": step, "run": run}))
    assert checkpoints.latest_checkpoint(out) == io.join(out, "ckpt", "step-00000004")
    # a restarted Ray Train group looks for the newest checkpoint of its own run (one id per fit)
    assert checkpoints.latest_checkpoint(out, run="a") == io.join(out, "ckpt", "step-00000002")
    assert checkpoints.latest_checkpoint(out, run="c") is None
    cfg = load_config(None, [f"train.output={out}", "train.resume=auto"])
    assert checkpoints.resolve_resume(cfg).endswith("step-00000004")
    bad = load_config(None, [f"train.output={out}", f"train.resume={tmp_path}/ckpt/step-00000006"])
    with pytest.raises(ConfigError, match="COMPLETE"):
        checkpoints.resolve_resume(bad)


@pytest.mark.parametrize("extra", [["sampling.mode=fps"], ["sampling.mode=random", "loss.shift_mode=quantile"],
                                   ["loss.lhp.enabled=true", "loss.depth.mode=distance"]])
def test_a_micro_batch_reads_back_to_the_host_once(extra):
    """The loop's step and bookkeeping never call ``item()`` / ``float()`` / ``bool()`` on a tensor (each is a host
    sync on CUDA: before, one per loss term and one for the NaN check); the scalars come back in one copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cluster.runlog import RankZeroLog
    from cluster.trainer import host_scalars, stop_if_not_finite
    from depthg.models.backbones import build_backbone
    from depthg.models.heads import build_segmenter
    from depthg.step import compute_losses

    class CountSyncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._local_scalar_dense:  # what item/float/bool run
                CountSyncs.count += 1
            return func(*args, **(kwargs or {}))

    cfg = load_config(None, ["model.code_dim=8", "sampling.samples=3", "model.n_classes=3", *extra])
    backbone = build_backbone("tiny_vit", "random")
    segmenter = build_segmenter(cfg.model, backbone.dim, cfg.loss.lhp.enabled)
    batch = {"image": torch.rand(4, 3, 32, 32), "pos_image": torch.rand(4, 3, 32, 32), "depth": torch.rand(4, 1, 32, 32),
             "pos_depth": torch.rand(4, 1, 32, 32), "label": torch.randint(-1, 3, (4, 32, 32))}
    with CountSyncs():  # the step and the read-back: device work (all of it on the GPU in a real run)
        out = compute_losses(backbone, segmenter, batch, cfg, 0, torch.Generator().manual_seed(0))
        scalars = host_scalars(out)
    assert CountSyncs.count == 0
    stop_if_not_finite(scalars, cfg, World(), 0, RankZeroLog.__new__(RankZeroLog))  # Python floats, CPU collective
    assert {"total", "stego", "cluster_probe", "linear_probe", "lambda", "S"} <= set(scalars)
    assert all(isinstance(v, float) for v in scalars.values())


# ----------------------------------------------------------------------------- real runs
TINY = ["model.backbone=tiny_vit", "data.resolution=32", "model.code_dim=8", "sampling.samples=3",
        "sampling.min_samples=2", "sampling.decay_every=2", "loss.depth.decay_every=2", "loss.neg_rounds=2",
        "train.micro_batch_per_gpu=2", "train.log_every=1", "train.loader_workers=1", "train.shuffle_buffer=4"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    shards.write_test_shards(root, 24, size=(32, 32), num_positives=2, samples_per_shard=3)
    shards.write_test_shards(root, 8, size=(32, 32), num_positives=2, samples_per_shard=2, split="val")
    return root


def _metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in io.read_bytes(path).decode().splitlines() if line.strip()]


def _train_in_process(root, output, *extra):
    from launch import train as launch_train

    return launch_train.main(["--launcher", "env", "--config", "none", f"shards.root={root}",
                              f"train.output={output}", *TINY, *extra])


def _final_state(output: str) -> dict:
    from depthg.checkpoint import load_segmenter

    _, seg, _ = load_segmenter(io.join(output, "segmenter.pt"))
    return seg.state_dict()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tmp_path, tiny_root):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _train_in_process(tiny_root, full, "train.num_batches=5", "train.ckpt_every=2")
    _train_in_process(tiny_root, part, "train.num_batches=3", "train.ckpt_every=2")  # "interrupted" after 3
    assert checkpoints.latest_checkpoint(part).endswith("step-00000003")
    # the 1-rank rendezvous of an in-process run leaves no launcher variable behind (a later launch from this
    # process would take them for its own: RANK + WORLD_SIZE select --launcher env)
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"} & set(os.environ)
    _train_in_process(tiny_root, part, "train.num_batches=5", "train.ckpt_every=2", "train.resume=auto")
    a, b = _metrics(os.path.join(full, "metrics.jsonl")), _metrics(os.path.join(part, "metrics.jsonl"))
    assert [m["batch"] for m in b] == [0, 1, 2, 3, 4]  # the resumed run continued at batch 3
    for key in ("total", "stego", "depth", "lambda", "b_depth", "S", "linear_probe"):
        assert a[-1][key] == pytest.approx(b[-1][key], rel=1e-5, abs=1e-7), key
    assert (a[-1]["lambda"], a[-1]["S"]) == (pytest.approx(0.19 * 0.6 ** 2), 2)
    sa, sb = _final_state(full), _final_state(part)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6)
    _check_finished_probes(full, tiny_root)


def _check_finished_probes(output: str, root: str) -> None:
    """train.finish=fit (the default): segmenter.pt's probes are the k-means / L-BFGS fit on the codes of the
    train crops (recomputed here from the saved head), not the probes of the last training step."""
    from cluster.engine import build_models
    from cluster.finish import finish_seed, finish_spec, train_codes
    from depthg import probes, streaming
    from depthg.checkpoint import load_segmenter

    cfg, seg, _ = load_segmenter(io.join(output, "segmenter.pt"))
    assert cfg.train.finish == "fit"
    backbone, trained = build_models(cfg, torch.device("cpu"))
    spec, _ = streaming.open_split(root, "train", micro_batch=2, resolution=cfg.data.resolution, seed=cfg.train.seed)
    codes, labels = train_codes(backbone, seg, finish_spec(spec, cfg.train.finish_samples), cfg.train.finish_samples)
    assert codes.shape[0] == 24  # every train crop (finish_samples 512 > 24)
    trained.load_state_dict(seg.state_dict())
    probes.fit_probes(trained, codes, labels, finish_seed(cfg.train.seed))
    for name, value in seg.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict()[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_gloo_workers_under_torchrun_see_disjoint_samples(tmp_path, tiny_root):
    from cluster.torchrun import run_local

    trace, out = str(tmp_path / "trace"), str(tmp_path / "run")
    args = ["--config", "none", f"shards.root={tiny_root}", f"train.output={out}", *TINY,
            "train.num_batches=3", "train.val_every=3", "train.select=label_free"]
    assert run_local(HOOKS_SCRIPT, ["--trace", trace, *args], nodes=1, per_node=2) == 0
    ids = []
    for rank in range(2):
        rows = _metrics(os.path.join(trace, f"rank{rank}.jsonl"))
        assert [r["batch"] for r in rows] == [0, 1, 2]  # equal steps on both ranks
        ids.append({i for r in rows for i in r["ids"]})
    assert len(ids[0]) == len(ids[1]) == 6 and not ids[0] & ids[1]
    last = _metrics(os.path.join(out, "metrics.jsonl"))
    assert all(torch.isfinite(torch.tensor(m["total"])) for m in last if "total" in m)
    val = [m for m in last if "val/miou" in m]
    assert val and val[-1]["val/samples"] == 8  # the whole val split, each sample once over the 2 ranks
    assert os.path.exists(os.path.join(out, "segmenter_best.pt"))
    assert os.path.exists(os.path.join(out, "segmenter.pt")) and os.path.exists(os.path.join(out, "config.yaml"))
    assert os.listdir(os.path.join(out, "tb"))

    # the same loop under `deepspeed --no_ssh` (emulated node 0 of 1; --local_rank=N passed): same numbers
    hostfile, out2 = tmp_path / "hostfile", str(tmp_path / "ds")
    hostfile.write_text("localhost slots=2\n")
    ds = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
          "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(distributed.free_port()),
          HOOKS_SCRIPT, "--launcher", "env", *args]
    ds[ds.index(f"train.output={out}")] = f"train.output={out2}"
    env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(ds, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = [m for m in last if "total" in m]
    b = [m for m in _metrics(os.path.join(out2, "metrics.jsonl")) if "total" in m]
    assert [m["batch"] for m in a] == [m["batch"] for m in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert x["total"] == pytest.approx(y["total"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_ray_train_two_cpu_workers_checkpoint_to_s3_and_recover(s3, ray_local, tiny_root, tmp_path):
    """Rank 1 dies once at batch 2; Ray Train restarts the group, which resumes from the newest S3 checkpoint
    of this launch (its run id), and finishes without training any batch twice."""
    from cluster.ray_train import TrainPlan, launch

    marker = tmp_path / "failed"
    out = f"{s3}/runs/ray"
    cfg = load_config(None, [f"shards.root={tiny_root}", f"train.output={out}", *TINY,
                             "train.num_batches=3", "train.ckpt_every=1", "train.max_failures=2"])
    # a spare restart: on a loaded machine Ray 2.60's PlacementGroupCleaner may take a slow state-API answer
    # for a dead Train controller and remove a fresh worker group (seen once here); the test counts batches
    result = launch(cfg, TrainPlan(nodes=1, per_node=2, use_gpu=False, cpus_per_worker=1.0),
                    hooks=train_hooks.FailOnce(1, 2, str(marker)))
    assert marker.exists()  # the failure did happen
    assert result["metrics"]["batch"] == 3 and result["ray_checkpoint"]
    for step in (1, 2, 3):
        assert io.exists(f"{out}/ckpt/step-{step:08d}/COMPLETE")
    rows = _metrics(f"{out}/metrics.jsonl")
    assert [r["batch"] for r in rows if "total" in r] == [0, 1, 2]  # resumed at 2: no batch trained twice
    assert io.exists(f"{out}/segmenter.pt") and io.exists(f"{out}/config.yaml")


# ----------------------------------------------------------------------------- configs
# (what each paper config reproduces is tested in tests/test_config.py and tests/test_golden_reference.py)
def test_demo_config_is_small_and_the_default_of_launch_train():
    from launch import train as launch_train

    cfg = launch_train.resolve_config(launch_train.parse_args([]))
    assert cfg == load_config(os.path.join(REPO, "configs", "demo.yaml"))
    assert cfg.data.dataset == "synthetic" and cfg.model.backbone == "effnet_lite0" and cfg.train.num_batches <= 100
    assert launch_train.resolve_config(launch_train.parse_args(["--config", "none"])).train.num_batches == 2334
    args = launch_train.parse_args(["--resume", "auto", "train.lr=1e-3", "--local_rank=1"])
    cfg = launch_train.resolve_config(args)
    assert (cfg.train.resume, cfg.train.lr, args.local_rank) == ("auto", 1e-3, 1)


def test_missing_shards_tell_the_user_to_generate_them(tmp_path):
    from launch import train as launch_train

    with pytest.raises(ConfigError, match="generate_depth"):
        launch_train.main(["--launcher", "local", f"shards.root={tmp_path}/nothing"])
