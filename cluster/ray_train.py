"""Multi-node training on a Ray cluster: a Ray Train (V2) ``TorchTrainer`` around ``cluster.trainer.train``.

``cluster.raycluster.connect()``, then ``cluster_plan(nodes, gpus_per_node, device)`` -> a ``TrainPlan`` (``plan_train``, pure):
the request decides GPU or CPU, never the nodes alive at launch. ``--gpus-per-node G`` asks for G GPU workers
on each node; the pending workers are what makes Ray's autoscaler start GPU nodes (the node types come from
``cluster.raycluster.autoscaler_node_types``, as the Ray stages' ``plan_actors``), and each worker reserves the
CPUs per GPU of the smallest node type that can hold G of them (``train.loader_workers=-1`` turns them into
loader workers). A request that no node type can hold is a ``ValueError`` before anything starts.
``launch(cfg, plan)`` then runs the fit. Ray Train creates the torch process group with ``torch_config``:
``cpu:gloo,cuda:nccl`` on GPUs (NCCL alone would serve no CPU tensor, see ``cluster.distributed``), gloo on
CPUs. It sets RANK / WORLD_SIZE / LOCAL_RANK / NODE_RANK, which ``cluster.world.detect`` reads, so each
worker runs the very same loop as under torchrun, with one DeepSpeed engine per worker. A GPU worker whose
torch sees no CUDA device stops with an error naming the node (``check_gpus``), unless the cluster's GPUs
are declared logical (``DEPTHG_EMULATED_GPUS=1``, tests only). Ray Train numbers nodes by IP address
(workers sharing an IP share a NODE_RANK); on a real cluster every machine has its own IP.

One launch, one run. The DeepSpeed checkpoints live under ``{train.output}/ckpt`` (local path or s3://,
written by the trainer); a launch resumes only when ``train.resume`` says so (``--resume auto``), checked in
the launching process (``cluster.preflight``). At every checkpoint all workers call ``ray.train.report`` (the
same number of times, as Ray requires); rank 0 attaches a tiny Ray ``Checkpoint`` holding ``pointer.json``.
After a worker failure Ray restarts the group (``FailureConfig(train.max_failures)``), which resumes from the
newest complete checkpoint written by this launch (its markers carry the run id passed to every worker).
Ray's own run folder is ``{train.output}/ray/{run id}``, new for every launch: Ray Train V2 reloads a run
folder it finds, which with a fixed name turned a new submission into a silent continuation of an old run.
Runs on a Ray cluster this process did not start (``cluster.raycluster.started_here()`` False), even on one
node, need shared storage such as s3:// (``launch/train.py`` refuses a local ``train.output`` there before any
worker starts; a custom S3 endpoint from AWS_ENDPOINT_URL / DEPTHG_S3_ENDPOINT is honoured through a pyarrow
filesystem). The workers get the driver's non-secret AWS_* /
DEPTHG_* variables (endpoint, region) through the worker runtime env; credentials come from the raylet's
environment or the instance role.
"""
from __future__ import annotations

import dataclasses
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
EMULATED_GPUS = "DEPTHG_EMULATED_GPUS"
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
    """The Ray Train worker function: detect the World, check the GPUs Ray gave it, run the loop.

    What to resume is decided by the launch, never by what Ray finds in storage: ``train.resume`` (explicit),
    or after a restart within this launch the newest checkpoint of its ``run`` (``cluster.trainer._resume``).
    """
    import ray.train

    from cluster.trainer import train
    from cluster.world import detect

    cfg, hooks, run = from_dict(Config, config["cfg"]), config.get("hooks"), config.get("run", "")
    check_gpus(bool(config.get("use_gpu")))
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


def emulated_gpus() -> bool:
    """True when the cluster's GPUs are logical (``DEPTHG_EMULATED_GPUS=1``: ``ray.cluster_utils`` nodes or the
    fake autoscaler in tests): GPU workers then train on the CPU with gloo. Never set on a real cluster."""
    return os.environ.get(EMULATED_GPUS) == "1"


def check_gpus(use_gpu: bool) -> list:
    """The GPU ids Ray assigned to this worker; raises when a GPU worker's torch sees no CUDA device (a node
    without a working NVIDIA driver would otherwise train on its CPU, slowly and silently)."""
    import ray
    import torch

    ids = list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    if use_gpu and not torch.cuda.is_available() and not emulated_gpus():
        raise RuntimeError(f"Ray assigned GPU(s) {ids} to this training worker on node "
                           f"{ray.get_runtime_context().get_node_id()}, but torch {torch.__version__} (built for CUDA "
                           f"{torch.version.cuda}) sees no CUDA device (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): the node's NVIDIA driver is missing or "
                           "older than this torch build needs (ray_cluster.yaml checks it at node start)")
    return ids


def torch_config(use_gpu: bool):
    """Ray Train's process-group settings: the same backend as the torchrun / deepspeed path (gloo for
    GPU workers of an emulated cluster, whose ranks train on the CPU)."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=process_group_backend("cuda" if use_gpu and not emulated_gpus() else "cpu"))


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """What a Ray Train launch asks the cluster for: ``nodes x per_node`` workers, each one GPU (``use_gpu``)
    or none, and ``cpus_per_worker`` CPUs (the loader workers' share, ``train.loader_workers=-1``)."""

    nodes: int
    per_node: int
    use_gpu: bool
    cpus_per_worker: float

    @property
    def num_workers(self) -> int:
        return self.nodes * self.per_node


CPU_WORKERS_PER_NODE = 2  # CPU ranks per node when --gpus-per-node is not given (as the local launcher)


def _names(types: list[dict]) -> str:
    return ", ".join(f"{t['name']} ({t['GPU']} GPU, {t['CPU']} CPU, up to {t['max_workers']})" for t in types) or "none"


def plan_train(nodes: int, per_node: int, device: str, alive: list[dict], node_types: list[dict] | None) -> TrainPlan:
    """The workers of ``--nodes N --gpus-per-node G --device D`` on a cluster (pure).

    ``alive``: the resources of each node up now (``ray.nodes()``); ``node_types``: what the autoscaler may
    start (``cluster.raycluster.autoscaler_node_types``; None = no autoscaler). The request, not the nodes that
    happen to be up, decides: ``G > 0`` with ``auto`` or ``cuda`` asks for G GPUs on each of N nodes, so the
    pending workers make the autoscaler start GPU nodes; ``G = 0`` with ``auto`` takes the GPUs per node of
    the cluster's GPU node types (CPU workers when it has and can add none). Each GPU worker reserves the
    CPUs per GPU of the smallest node that can hold G of them. A request no node type (or, without an
    autoscaler, no node up) can hold raises ``ValueError`` naming what the cluster has.
    """
    from cluster.raycluster import DEVICES

    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if nodes < 1 or per_node < 0:
        raise ValueError(f"--nodes {nodes} --gpus-per-node {per_node}: expected nodes >= 1 and gpus-per-node >= 0")
    up = [{"name": "(up now)", "CPU": int(r.get("CPU", 0)), "GPU": int(r.get("GPU", 0)), "max_workers": 1}
          for r in alive]
    gpu_kinds = [t for t in up + list(node_types or []) if t["GPU"] > 0]
    if device == "cpu" or (device == "auto" and per_node == 0 and not gpu_kinds):
        return _plan_cpu(nodes, per_node or CPU_WORKERS_PER_NODE, up, node_types)
    if per_node == 0 and not gpu_kinds:  # --device cuda on a cluster that has and can add no GPU
        up_now = ", ".join(f"{t['CPU']} CPU / {t['GPU']} GPU" for t in up) or "none"
        where = (f"its autoscaler can start {_names(node_types)}" if node_types is not None
                 else "it has no autoscaler that could add nodes")
        raise ValueError(f"--device cuda: the cluster has no GPU and cannot add one (nodes up now: {up_now}; {where}). "
                         "Add a GPU node type to the cluster config, or train on CPU workers with --device cpu")
    if per_node == 0:
        per_node = min(t["GPU"] for t in gpu_kinds)
    fits_up = [t for t in up if t["GPU"] >= per_node]
    fits_types = [t for t in node_types or [] if t["GPU"] >= per_node]
    reach = max(len(fits_up), sum(max(t["max_workers"], 0) for t in fits_types))
    if reach < nodes:
        where = (f"its autoscaler can start {_names(node_types)}" if node_types is not None
                 else "it has no autoscaler that could add nodes")
        have = sorted({t["GPU"] for t in up}) or [0]
        raise ValueError(f"--nodes {nodes} --gpus-per-node {per_node} needs {nodes} node(s) with at least {per_node} "
                         f"GPU(s) each; the cluster can provide {reach}: GPUs per node up now {have}, {where}. "
                         "Lower --nodes / --gpus-per-node, add a GPU node type to the cluster config, or pass "
                         "--device cpu")
    ratios = [t["CPU"] // t["GPU"] for t in fits_up + fits_types]
    return TrainPlan(nodes, per_node, True, float(max(1, min(ratios))))


def _plan_cpu(nodes: int, per_node: int, up: list[dict], node_types: list[dict] | None) -> TrainPlan:
    """CPU workers, one CPU each; without an autoscaler they must fit the CPUs up now."""
    cpus = sum(t["CPU"] for t in up)
    if node_types is None and cpus < nodes * per_node:
        raise ValueError(f"--nodes {nodes} --gpus-per-node {per_node} --device cpu needs {nodes * per_node} CPU "
                         f"workers; the cluster has {cpus} CPU(s) and no autoscaler")
    return TrainPlan(nodes, per_node, False, 1.0)


def _fit(cfg_dict: dict, plan: TrainPlan, run: str, hooks=None) -> dict:
    """Build and fit the TorchTrainer (runs inside a Ray task so that the Train controller and the
    workers inherit its runtime env: the storage endpoint and credentials). Ray's own run folder is
    ``{train.output}/ray/{run}``: one per launch, so Ray never hands a new launch an old run's checkpoint."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg = from_dict(Config, cfg_dict)
    path, filesystem = storage(io.join(cfg.train.output, "ray"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg_dict, "hooks": hooks, "run": run, "use_gpu": plan.use_gpu},
        torch_config=torch_config(plan.use_gpu),
        scaling_config=scaling_config(plan),
        run_config=RunConfig(name=run, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    result = trainer.fit()
    return {"output": cfg.train.output, "metrics": dict(result.metrics or {}), "run": run, "plan": dataclasses.asdict(plan),
            "ray_checkpoint": result.checkpoint.path if result.checkpoint else None}


def scaling_config(plan: TrainPlan):
    """Ray Train's ScalingConfig of a plan: one GPU per worker when ``use_gpu``, its CPUs beside it."""
    from ray.train import ScalingConfig

    resources = {"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})}
    return ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker=resources)


def cluster_plan(nodes: int, per_node: int, device: str = "auto") -> TrainPlan:
    """``plan_train`` for the connected cluster (nodes up now and the autoscaler's node types)."""
    import ray

    from cluster.raycluster import autoscaler_node_types

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return plan_train(nodes, per_node, device, alive, autoscaler_node_types())


def launch(cfg: Config, plan: TrainPlan, extra_env: dict | None = None, hooks=None) -> dict:
    """Run training with ``plan``'s workers on the Ray cluster this process is connected to (``connect``; a
    local Ray when it is not).

    The driver's non-secret AWS_* / DEPTHG_* variables (endpoint, region, profile; see ``worker_env``),
    ``extra_env`` and the repo path reach the Train controller and workers through the runtime env of the
    task that runs ``trainer.fit()``. ``hooks`` (a picklable ``cluster.trainer.Hooks``) reaches every
    worker's loop. Returns the last metrics, the run id and the plan.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.raycluster import connect

    connect()  # a no-op when the launcher connected (cluster.raycluster: one connect for every stage)
    env = worker_env(extra_env)
    if not plan.use_gpu or emulated_gpus():
        env.setdefault("DS_ACCELERATOR", "cpu")
    # the Train controller lives where trainer.fit() runs: keep it on the driver's node (the head), not on a
    # worker node that may go away
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    fit = ray.remote(num_cpus=0)(_fit).options(runtime_env={"env_vars": env}, scheduling_strategy=here)
    return ray.get(fit.remote(to_dict(cfg), plan, uuid.uuid4().hex[:16], hooks))
