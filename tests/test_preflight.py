"""Errors a user reads (issue 11 section 7): every training check that needs no worker runs in the launching
process (``launch/train.py`` main -> ``cluster.preflight``) and raises ``ConfigError`` naming the key or file,
before any worker is spawned or backbone loaded. Before, ``sampling.samples=100`` and an existing file as
``train.output`` surfaced only as ``error: a training worker exited with status 1`` after the spawn."""
from __future__ import annotations

import json
import os
import re

import pytest

from cluster import distributed
from depthg import shards
from depthg.config import ConfigError
from depthg.world import World
from launch import train as launch_train

TINY = ["model.backbone=tiny_vit", "data.resolution=32", "model.code_dim=8", "sampling.samples=3",
        "sampling.min_samples=2", "train.micro_batch_per_gpu=2", "train.val_every=0"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    shards.write_test_shards(folder, 12, size=(32, 32), num_positives=2, samples_per_shard=3)
    return folder


def _main(root, tmp_path, *extra, launcher="local"):
    # --launcher local would spawn torchrun workers after the checks: a ConfigError proves none was spawned
    return launch_train.main(["--launcher", launcher, "--gpus-per-node", "2", "--config", "none",
                              f"shards.root={root}", f"train.output={tmp_path / 'run'}", *TINY, *extra])


@pytest.mark.parametrize("extra,pattern", [
    (["data.resolution=112", "sampling.samples=100"],
     r"sampling\.samples=100: 100\^2 locations do not fit the 14x14 feature grid .*data\.resolution=112"),
    (["data.resolution=36"], r"data\.resolution=36: expected a multiple of the backbone stride 8"),
    (["train.micro_batch_per_gpu=1"], r"train\.micro_batch_per_gpu=1: .*at least 2"),
    (["train.select=label_free"], r"train\.select=label_free .*train\.val_every > 0"),
    (["train.val_every=5"], r"train\.val_every=5 .* need a val split: found no .*val/manifest\.json"),
    (["train.micro_batch_per_gpu=8"], r"with 2 rank\(s\): 12 samples cannot fill one optimizer step of 16"),
    (["train.resume=/nowhere/ckpt/step-00000002"], r"train\.resume=/nowhere/ckpt/step-00000002: not a complete"),
])
def test_bad_settings_fail_in_the_launching_process(root, tmp_path, extra, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _main(root, tmp_path, *extra)
    assert not os.path.exists(tmp_path / "run")  # nothing started, nothing written


def test_output_naming_an_existing_file(root, tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(ConfigError, match=r"train\.output=.*run: an existing file; expected a folder"):
        _main(root, tmp_path)
    with pytest.raises(ConfigError, match=r"an existing file"):  # the env launcher checks too
        _main(root, tmp_path, launcher="env")


def test_missing_shards_and_manifest_name_the_files(root, tmp_path):
    with pytest.raises(ConfigError, match=r"no shard manifest at .*nowhere/train/manifest\.json: run generate_depth"):
        _main(str(tmp_path / "nowhere"), tmp_path)
    broken = tmp_path / "broken"
    shards.write_test_shards(str(broken), 12, size=(32, 32), num_positives=2, samples_per_shard=3)
    os.remove(broken / "train" / "shard-000002.tar")
    with pytest.raises(ConfigError, match=r"manifest\.json lists shards that are missing: shard-000002\.tar"):
        _main(str(broken), tmp_path)


def test_resume_from_another_model_names_the_keys(root, tmp_path):
    ckpt = tmp_path / "run" / "ckpt" / "step-00000002"
    ckpt.mkdir(parents=True)
    marker = {"batch": 2, "model": {"model.backbone": "tiny_vit", "model.code_dim": 16, "model.n_classes": 3,
                                    "model.extra_clusters": 0, "loss.lhp.enabled": False}}
    (ckpt / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(ConfigError, match=r"step-00000002 was written with other model settings \(model\.code_dim: "
                                          r"checkpoint 16, this run 8\)"):
        _main(root, tmp_path, "train.resume=auto")


def test_loader_workers_auto_from_the_cpus_per_rank():
    assert distributed.loader_workers(3, World(), cpus=64) == 3  # an explicit count is kept
    node4x4 = World(rank=5, world_size=16, local_rank=1, node=1, num_nodes=4)
    assert distributed.loader_workers(-1, node4x4, cpus=48) == 11  # g5.12xlarge: 48 vCPUs / 4 GPUs, one for the trainer
    assert distributed.loader_workers(-1, node4x4, cpus=192) == distributed.MAX_AUTO_LOADER_WORKERS
    assert distributed.loader_workers(-1, World(rank=1, world_size=2, local_rank=1), cpus=2) == 0


# ----------------------------------------------------------------------------- one output folder, one run
def test_a_new_run_into_a_used_output_is_refused_naming_resume_auto(root, tmp_path):
    # before: the trainer (and Ray Train's reloaded run folder) silently continued or skipped the old run
    run = tmp_path / "run"
    (run / "ckpt" / "step-00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {}\n")
    for launcher in ("local", "env"):
        with pytest.raises(ConfigError, match=r"train\.output=.*run already holds a run \(ckpt, config\.yaml\); "
                                              r"continue it with --resume auto"):
            _main(root, tmp_path, launcher=launcher)
    assert sorted(os.listdir(run)) == ["ckpt", "config.yaml"]  # nothing touched


def test_a_local_output_for_shared_workers_is_refused(root, tmp_path):
    from cluster import preflight
    from depthg.config import load_config

    cfg = load_config(None, [f"shards.root={root}", f"train.output={tmp_path / 'run'}", *TINY])
    with pytest.raises(ConfigError, match=r"train\.output=.*run: a local folder, but the training workers run on a "
                                          r"Ray cluster this process did not start.*s3://"):
        preflight.check(cfg, 4, shared=True)
    preflight.check(cfg, 4)  # a local Ray started here (or torchrun on one machine): a local folder is fine


JOIN = """
import json, sys
from depthg.errors import DepthgError
from launch import pipeline, train
from cluster import raycluster
out = {}
for name, main, argv in (("train", train.main, ["--launcher", "ray", "--address", sys.argv[1], "--nodes", "1",
                                                 "--gpus-per-node", "1", "--device", "cpu"]),
                         ("pipeline", pipeline.main, [])):
    try:
        main(argv + ["--config", "none", "shards.root=" + sys.argv[2], "train.output=" + sys.argv[3]])
        out[name] = "ran"
    except DepthgError as exc:
        out[name] = str(exc)
out["started_here"] = raycluster.started_here()
print("RESULT " + json.dumps(out))
"""


def test_one_node_on_a_joined_ray_refuses_a_local_output_before_any_worker(ray_local, tmp_path):
    """Issue 28.1: ``--nodes 1`` on a Ray this process did not start trains on a worker node (a head without
    CPUs), so a local ``train.output`` is refused naming s3:// before any worker starts, and so does the pipeline
    under RAY_ADDRESS before stage 1. Before, ``shared=plan.nodes > 1``: one node passed the output check (the
    missing shards were the first complaint) and the first checkpoint failed on the workers. The driver runs in
    its own process, joining this test process's local Ray: a Ray it did not start."""
    import subprocess
    import sys

    from cluster import raycluster

    assert raycluster.started_here()  # ray_local: this process's own ray.init
    address = ray_local.get_runtime_context().gcs_address
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "RAY_ADDRESS": address, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-c", JOIN, address, str(tmp_path / "no-shards"), str(tmp_path / "run")],
                         env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, run.stdout[-3000:] + run.stderr[-3000:]
    seen = json.loads(line[len("RESULT "):])
    assert seen["started_here"] is False
    for name in ("train", "pipeline"):
        assert re.match(r"train\.output=.*run: a local folder, but the training workers run on a Ray cluster this "
                        r"process did not start.*s3://", seen[name]), (name, seen[name])
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "no-shards")  # nothing written


def test_max_failures_is_a_setting(root, tmp_path):
    from depthg.config import load_config

    assert load_config(None, ["train.max_failures=7"]).train.max_failures == 7
    with pytest.raises(ConfigError, match=r"train\.max_failures"):
        load_config(None, ["train.max_failures=-3"])


# ----------------------------------------------------------------------------- Ray Train's request
def _yaml_types():
    import yaml

    from cluster.raycluster import node_types_from_config

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "ray_cluster.yaml")) as fh:
        return node_types_from_config(yaml.safe_load(fh))


def test_ray_train_asks_for_gpus_the_autoscaler_has_not_started_yet():
    from cluster.ray_train import TrainPlan, plan_train

    head_only = [{"CPU": 0}]  # `ray up ray_cluster.yaml`, GPU nodes idled out: before, 16 CPU workers on gloo
    assert plan_train(4, 4, "auto", head_only, _yaml_types()) == TrainPlan(4, 4, True, 12.0)
    assert plan_train(2, 0, "auto", head_only, _yaml_types()) == TrainPlan(2, 4, True, 12.0)  # G from the node type
    assert plan_train(1, 2, "cuda", head_only, _yaml_types()).use_gpu
    assert plan_train(2, 3, "cpu", head_only, _yaml_types()) == TrainPlan(2, 3, False, 16.0)  # 3 per 48-CPU node
    with pytest.raises(ValueError, match=r"--nodes 5 --gpus-per-node 4 needs 5 node\(s\).*can provide 4.*gpu_a10g_x4"):
        plan_train(5, 4, "auto", head_only, _yaml_types())
    with pytest.raises(ValueError, match=r"--gpus-per-node 8 needs 1 node\(s\) with at least 8 GPU"):
        plan_train(1, 8, "auto", head_only, _yaml_types())


def test_ray_train_plan_without_an_autoscaler_uses_the_nodes_up():
    from cluster.ray_train import TrainPlan, plan_train

    up = [{"CPU": 8}, {"CPU": 48, "GPU": 4}, {"CPU": 32, "GPU": 4}]  # CPUs per GPU of the smallest node: 8
    assert plan_train(2, 4, "auto", up, None) == TrainPlan(2, 4, True, 8.0)
    assert plan_train(1, 2, "auto", up, None) == TrainPlan(1, 2, True, 16.0)  # one node: STRICT_PACK, half of 32
    with pytest.raises(ValueError, match=r"no autoscaler"):
        plan_train(3, 4, "auto", up, None)
    cpu_only = [{"CPU": 2}, {"CPU": 2}]
    with pytest.raises(ValueError, match=r"--gpus-per-node 1 .*--device cpu"):
        plan_train(2, 1, "auto", cpu_only, None)
    assert plan_train(2, 0, "auto", cpu_only, None) == TrainPlan(2, 2, False, 1.0)  # no GPU anywhere: CPU ranks
    with pytest.raises(ValueError, match=r"needs 6 CPU workers; the cluster has 4"):
        plan_train(2, 3, "cpu", cpu_only, None)


def test_cuda_on_a_cluster_without_gpu_node_types_names_what_it_has():
    """Issue 28.8: before, ``min() arg is an empty sequence``."""
    from cluster.ray_train import plan_train

    cpu_types = [{"name": "cpu_m5", "CPU": 8, "GPU": 0, "max_workers": 3}]
    with pytest.raises(ValueError, match=r"--device cuda: the cluster has no GPU and cannot add one \(nodes up now: "
                                         r"0 CPU / 0 GPU; its autoscaler can start cpu_m5 \(0 GPU, 8 CPU, up to 3\)\)"
                                         r".*--device cpu"):
        plan_train(1, 0, "cuda", [{"CPU": 0}], cpu_types)
    with pytest.raises(ValueError, match=r"nodes up now: 2 CPU / 0 GPU, 2 CPU / 0 GPU; it has no autoscaler"):
        plan_train(2, 0, "cuda", [{"CPU": 2}, {"CPU": 2}], None)


def test_the_plan_puts_exactly_g_workers_on_each_node():
    """Issue 28.7: each worker reserves the CPUs that let a node hold G workers and no more, so Ray Train's PACK
    fills N nodes with G each. Before: 12 CPUs per worker on 48-CPU / 4-GPU nodes, and ``--nodes 4
    --gpus-per-node 2`` packed 8 workers on 2 nodes while printing "4 node(s)"."""
    from cluster.ray_train import TrainPlan, plan_train, scaling_config

    head_only = [{"CPU": 0}]
    for g, cpus in ((1, 48.0), (2, 24.0), (3, 16.0), (4, 12.0)):
        plan = plan_train(4, g, "auto", head_only, _yaml_types())
        assert plan == TrainPlan(4, g, True, cpus)
        assert int(48 // plan.cpus_per_worker) == g  # a g5.12xlarge holds exactly g of them
    assert scaling_config(plan_train(4, 2, "auto", head_only, _yaml_types())).placement_strategy == "PACK"
    assert scaling_config(plan_train(1, 2, "auto", head_only, _yaml_types())).placement_strategy == "STRICT_PACK"
    mixed = [{"CPU": 48, "GPU": 4}, {"CPU": 32, "GPU": 4}]  # no one reservation holds exactly 2 on both
    with pytest.raises(ValueError, match=r"no CPU reservation puts exactly 2 worker\(s\) on every node"):
        plan_train(2, 2, "auto", mixed, None)
    assert plan_train(2, 4, "auto", mixed, None) == TrainPlan(2, 4, True, 8.0)  # 4 GPUs cap both


def test_the_workers_layout_is_checked_against_the_plan():
    from cluster.ray_train import TrainPlan, describe_layout, layout_problem

    plan = TrainPlan(2, 2, True, 24.0)
    assert layout_problem(["a", "a", "b", "b"], plan) is None
    assert layout_problem(["a", "b", "a", "b"], plan) is None  # ranks in any order
    assert layout_problem(["a", "a", "a", "a"], plan) == ("Ray placed the 4 training workers on 1 node(s) (a: 4), "
                                                          "not 2 node(s) x 2")
    assert "on 3 node(s)" in layout_problem(["a", "a", "b", "c"], plan)
    assert describe_layout(["a", "b", "a"]) == "node a: rank(s) 0,2; node b: rank(s) 1"
