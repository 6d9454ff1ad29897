"""Multi-node training on a Ray cluster: a Ray Train (V2) ``TorchTrainer`` around ``cluster.trainer.train``.

``launch(cfg, num_workers)`` starts ``num_workers`` = nodes x GPUs-per-node workers; Ray Train creates the
torch process group with ``torch_config``: ``cpu:gloo,cuda:nccl`` on GPUs (NCCL alone would serve no CPU
tensor, see ``cluster.distributed``), gloo on CPUs. It sets RANK / WORLD_SIZE / LOCAL_RANK / NODE_RANK,
which ``cluster.world.detect`` reads, so each worker runs the very same loop as under torchrun, with one
DeepSpeed engine per worker. Ray Train numbers nodes by IP address (workers sharing an IP share a
NODE_RANK); on a real cluster every machine has its own IP, so NODE_RANK is the machine's index.
On GPU clusters each worker reserves the CPUs per GPU of the smallest GPU node (``cpus_per_gpu``), which
``train.loader_workers=-1`` (auto) turns into loader workers.

Checkpoints: the DeepSpeed checkpoints live under ``{train.output}/ckpt`` (local path or s3://, written by
the trainer). At every checkpoint all workers call ``ray.train.report`` (the same number of times, as Ray
requires); rank 0 attaches a tiny Ray ``Checkpoint`` holding ``pointer.json`` = the DeepSpeed checkpoint
URL. After a worker failure Ray restarts the group (``FailureConfig(max_failures)``), which resumes from the
newest complete checkpoint written by this ``fit`` (its markers carry the run id passed to every worker):
that also covers a group that died after the checkpoint but before Ray's controller had registered the
report. Without one, ``ray.train.get_checkpoint()`` hands the pointer back (a run Ray restored). Ray's own
run folder is ``{train.output}/ray`` (``RunConfig(storage_path=...)``; multi-node runs need shared storage
such as s3://; a custom S3 endpoint from AWS_ENDPOINT_URL / DEPTHG_S3_ENDPOINT is honoured through a pyarrow
filesystem). The workers get the driver's non-secret AWS_* / DEPTHG_* variables (endpoint, region) through
the worker runtime env; credentials come from the raylet's environment or the instance role.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import uuid

from cluster.distributed import process_group_backend
from depthg import io
from depthg.config import Config, from_dict, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINTER = "pointer.json"
_PASS_ENV = ("AWS_", "DEPTHG_", "DS_ACCELERATOR", "OMP_NUM_THREADS")
# never forwarded: the runtime env is visible in the Ray dashboard and state API
_SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY)", re.I)
_PATH_ENV = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE")


def worker_env(extra: dict | None = None) -> dict:
    """Environment for the Ray Train workers: repo on the path, storage endpoint, region, profile.

    Credentials are not forwarded (the runtime env is shown in the Ray dashboard): workers on a local
    Ray inherit them from the raylet's environment, on a cluster they come from the instance role or
    a credentials file named by AWS_SHARED_CREDENTIALS_FILE. ``extra`` is added as given (an explicit
    opt-in, e.g. keys for a throwaway moto server in tests).
    """
    env = {k: v for k, v in os.environ.items()
           if k.startswith(_PASS_ENV) and (k in _PATH_ENV or not _SECRET_ENV.search(k))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def storage(output: str):
    """``(storage_path, storage_filesystem)`` for Ray's run folder under ``output``.

    Remote outputs go through the same fsspec filesystem as ``depthg.io`` (endpoint from the
    environment), wrapped for pyarrow: one code path for AWS, MinIO and moto alike.
    """
    if not io.is_remote(output):
        return os.path.abspath(output), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = io.filesystem(output)
    return path, PyFileSystem(FSSpecHandler(fs))


def train_worker(config: dict) -> None:
    """The Ray Train worker function: detect the World, resume from Ray's checkpoint, run the loop."""
    import dataclasses

    import ray.train

    from cluster.trainer import train
    from cluster.world import detect

    cfg, hooks, run = from_dict(Config, config["cfg"]), config.get("hooks"), config.get("run", "")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder, open(os.path.join(folder, POINTER)) as fh:
            url = json.load(fh)["url"]
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=url))
    world = detect()

    def on_checkpoint(url: str, batch: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            ray_ckpt = None
            if world.is_main:
                with open(os.path.join(folder, POINTER), "w") as fh:
                    json.dump({"url": url, "batch": batch}, fh)
                ray_ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"batch": batch, **metrics}, checkpoint=ray_ckpt)

    train(cfg, world, on_checkpoint=on_checkpoint, hooks=hooks, run=run)


def torch_config(use_gpu: bool):
    """Ray Train's process-group settings: the same backend as the torchrun / deepspeed path."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=process_group_backend("cuda" if use_gpu else "cpu"))


def cpus_per_gpu(nodes: list[dict]) -> float:
    """CPUs per GPU of the alive GPU node with the fewest (``ray.nodes()`` entries); 1 without GPU nodes."""
    ratios = [n["Resources"]["CPU"] / n["Resources"]["GPU"] for n in nodes
              if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) >= 1 and n["Resources"].get("CPU")]
    return float(max(1, int(min(ratios)))) if ratios else 1.0


def _fit(cfg_dict: dict, num_workers: int, use_gpu: bool, max_failures: int, cpus_per_worker: float,
         hooks=None) -> dict:
    """Build and fit the TorchTrainer (runs inside a Ray task so that the Train controller and the
    workers inherit its runtime env: the storage endpoint and credentials)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = from_dict(Config, cfg_dict)
    path, filesystem = storage(cfg.train.output)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg_dict, "hooks": hooks, "run": uuid.uuid4().hex},
        torch_config=torch_config(use_gpu),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="ray", storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    return {"output": cfg.train.output, "metrics": dict(result.metrics or {}),
            "ray_checkpoint": result.checkpoint.path if result.checkpoint else None}


def launch(cfg: Config, num_workers: int, address: str | None = None, use_gpu: bool | None = None,
           max_failures: int = 2, cpus_per_worker: float | None = None, extra_env: dict | None = None,
           hooks=None) -> dict:
    """Run training on Ray (connecting to ``address`` / RAY_ADDRESS, else a local Ray).

    ``use_gpu=None`` means: use GPUs when the cluster has any. ``cpus_per_worker=None``: the CPUs per GPU
    on GPU clusters (``cpus_per_gpu``), else 1. The driver's non-secret AWS_* / DEPTHG_* variables
    (endpoint, region, profile; see ``worker_env``), ``extra_env`` and the repo path reach the Train
    controller and workers through the runtime env of the task that runs ``trainer.fit()``. ``hooks``
    (a picklable ``cluster.trainer.Hooks``) reaches every worker's loop.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    env = worker_env(extra_env)
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, runtime_env={"env_vars": env})
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    if cpus_per_worker is None:
        cpus_per_worker = cpus_per_gpu(ray.nodes()) if use_gpu else 1.0
    # the Train controller lives where trainer.fit() runs: keep it on the driver's node (the head), not on a
    # worker node that may go away
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    fit = ray.remote(num_cpus=0)(_fit).options(runtime_env={"env_vars": env}, scheduling_strategy=here)
    return ray.get(fit.remote(to_dict(cfg), num_workers, use_gpu, max_failures, cpus_per_worker, hooks))
