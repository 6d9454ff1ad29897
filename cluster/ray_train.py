"""Multi-node training on a Ray cluster: a Ray Train (V2) ``TorchTrainer`` around ``cluster.trainer.train``.

``cluster.raycluster.connect()``, then ``cluster_plan(nodes, gpus_per_node, device)`` -> a ``TrainPlan`` (``plan_train``, pure):
the request decides GPU or CPU, never the nodes alive at launch. ``--gpus-per-node G`` asks for G GPU workers
on each node; the pending workers are what makes Ray's autoscaler start GPU nodes (the node types come from
``cluster.raycluster.autoscaler_node_types``, as the Ray stages' ``plan_actors``), and each worker reserves a
G-th of the CPUs of the smallest node type that can hold G of them (``train.loader_workers=-1`` turns them into
loader workers). A request that no node type can hold is a ``ValueError`` before anything starts. The layout
asked for is the layout run: a worker's CPU reservation lets a node hold G workers and no more (``worker_cpus``),
the group is packed (``scaling_config``), and each worker checks where Ray placed the group (``check_layout``:
rank 0 prints the node ids; another layout stops the group).
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
newest complete checkpoint written by this launch (its markers carry the run id passed to every worker), except
for a worker on a node that failed its start-up check (``check_node``, ``cluster.raycluster``): that ends the run
at once, whatever ``train.max_failures`` says (a Ray Train callback turns it into a controller error, which Ray
Train never retries), and ``launch`` raises it as one ``NodeCheckError``.
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
# the node start-up check (ray_cluster.yaml) has one implementation, cluster.raycluster's: a worker calls check_node
# first, a worker's NodeCheckError ends the run without a retry (_stop_on_node_check), cluster_plan refuses the nodes
from cluster.raycluster import check_node, failed_nodes, node_check_error, refuse_failed_nodes  # noqa: F401
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
    check_node()
    check_gpus(bool(config.get("use_gpu")))
    world = detect()
    check_layout(world, config.get("plan"))

    def on_checkpoint(url: str, batch: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            ray_ckpt = None
            if world.is_main:
                with open(os.path.join(folder, POINTER), "w") as fh:
                    json.dump({"url": url, "batch": batch}, fh)
                ray_ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"batch": batch, **metrics}, checkpoint=ray_ckpt)

    train(cfg, world, on_checkpoint=on_checkpoint, hooks=hooks, run=run)


def check_layout(world, plan: TrainPlan | None) -> list[str]:
    """Every rank: where Ray placed the group (rank 0 prints it: the layout that runs, after start); a layout other
    than the plan's stops the group with that message on every rank (they all gathered the same list)."""
    nodes = worker_layout(world)
    if world.is_main:
        print(f"ray: workers placed on {len(set(nodes))} node(s): {describe_layout(nodes)}", flush=True)
    problem = layout_problem(nodes, plan) if plan is not None else None
    if problem:
        raise RuntimeError(f"{problem}: the layout asked for is not the one Ray gave (nodes busy with other work?); "
                           "stopping rather than training on another layout")
    return nodes


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
    the cluster's GPU node types (CPU workers when it has and can add none). The layout asked for is the
    layout run: each worker reserves ``worker_cpus`` CPUs, so that every node that can host the run holds G
    workers and none holds more (Ray Train's PACK would otherwise put 8 workers of ``--nodes 4
    --gpus-per-node 2`` on two 4-GPU nodes); ``scaling_config`` packs the group, N x G workers then need N
    nodes. A request no node type (or, without an autoscaler, no node up) can hold raises ``ValueError``
    naming what the cluster has.
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
    return TrainPlan(nodes, per_node, True, worker_cpus(per_node, fits_up + fits_types, gpus=True, cap=nodes > 1))


def worker_cpus(per_node: int, hosts: list[dict], gpus: bool, cap: bool = True) -> float:
    """CPUs each of G = ``per_node`` workers reserves: the most a G-th of the smallest host in ``hosts`` (the node
    kinds with room for G workers) offers, so that every host holds G; with ``cap`` (several nodes) also enough
    that G + 1 never fit a host whose GPUs (``gpus``; any host for CPU workers) would allow more, so no node
    holds more than G (one node needs no cap: ``STRICT_PACK``). Hosts whose CPU counts leave no such number
    raise ``ValueError``."""
    hosts = [h for h in hosts if h["CPU"] >= per_node]
    if not hosts:  # nothing known yet (e.g. no node up and no autoscaler config): one CPU each
        return 1.0
    most = min(h["CPU"] // per_node for h in hosts)
    capped = [h for h in hosts if cap and (not gpus or h["GPU"] > per_node)]  # exactly G GPUs cap a host too
    least = max([h["CPU"] // (per_node + 1) + 1 for h in capped], default=1)
    if least > most:
        kinds = ", ".join(f"{h['name']} ({h['CPU']} CPU, {h['GPU']} GPU)" for h in hosts)
        raise ValueError(f"--gpus-per-node {per_node}: no CPU reservation puts exactly {per_node} worker(s) on every "
                         f"node of {kinds}; use node types of one size, or --gpus-per-node equal to their GPUs")
    return float(most)


def _plan_cpu(nodes: int, per_node: int, up: list[dict], node_types: list[dict] | None) -> TrainPlan:
    """CPU workers, G per node (``worker_cpus``); without an autoscaler they must fit the nodes up now."""
    cpus = sum(t["CPU"] for t in up)
    if node_types is None and cpus < nodes * per_node:
        raise ValueError(f"--nodes {nodes} --gpus-per-node {per_node} --device cpu needs {nodes * per_node} CPU "
                         f"workers; the cluster has {cpus} CPU(s) and no autoscaler")
    hosts = [t for t in up + list(node_types or []) if t["CPU"] >= per_node]
    if node_types is None and len(hosts) < nodes:
        raise ValueError(f"--nodes {nodes} --gpus-per-node {per_node} --device cpu needs {nodes} node(s) with "
                         f"{per_node} CPUs each; the cluster has {len(hosts)} and no autoscaler (CPUs per node up now "
                         f"{sorted(t['CPU'] for t in up)})")
    return TrainPlan(nodes, per_node, False, worker_cpus(per_node, hosts, gpus=False, cap=nodes > 1))


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
        train_loop_config={"cfg": cfg_dict, "hooks": hooks, "run": run, "use_gpu": plan.use_gpu, "plan": plan},
        torch_config=torch_config(plan.use_gpu),
        scaling_config=scaling_config(plan),
        run_config=RunConfig(name=run, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             callbacks=[_stop_on_node_check()]),
    )
    result = trainer.fit()
    return {"output": cfg.train.output, "metrics": dict(result.metrics or {}), "run": run, "plan": dataclasses.asdict(plan),
            "ray_checkpoint": result.checkpoint.path if result.checkpoint else None}


def _stop_on_node_check():
    """A Ray Train callback (on the Train controller) that ends the run when a worker raised ``NodeCheckError``:
    FailureConfig would restart the group on the same broken node (``train.max_failures`` times, or forever at
    -1); an error raised by a callback is a controller error, which Ray Train raises instead of retrying."""
    from ray.train import UserCallback

    class StopOnNodeCheck(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank in sorted(worker_exceptions):
                found = node_check_error(worker_exceptions[rank])
                if found is not None:
                    raise found

    return StopOnNodeCheck()


def scaling_config(plan: TrainPlan):
    """Ray Train's ScalingConfig of a plan: one GPU per worker when ``use_gpu``, its CPUs beside it (which cap a
    node at ``per_node`` workers, ``worker_cpus``), packed: ``STRICT_PACK`` for one node (all workers on it),
    ``PACK`` for several (with the cap, N x G workers fill N nodes)."""
    from ray.train import ScalingConfig

    resources = {"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})}
    return ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker=resources,
                         placement_strategy="STRICT_PACK" if plan.nodes == 1 else "PACK")


def worker_layout(world) -> list[str]:
    """The Ray node id of every rank (index = rank), gathered over the CPU group; every rank calls it."""
    import ray
    import torch.distributed as dist

    from cluster.distributed import cpu_group

    node = ray.get_runtime_context().get_node_id()
    if not world.distributed:
        return [node]
    nodes: list = [None] * world.world_size
    dist.all_gather_object(nodes, node, group=cpu_group())
    return nodes


def layout_problem(nodes_of_ranks: list[str], plan: TrainPlan) -> str | None:
    """None when the ranks sit ``plan.per_node`` on each of ``plan.nodes`` nodes, else what Ray placed."""
    counts: dict[str, int] = {}
    for node in nodes_of_ranks:
        counts[node] = counts.get(node, 0) + 1
    if len(counts) == plan.nodes and set(counts.values()) == {plan.per_node}:
        return None
    placed = ", ".join(f"{n[:12]}: {c}" for n, c in counts.items())
    return (f"Ray placed the {len(nodes_of_ranks)} training workers on {len(counts)} node(s) ({placed}), not "
            f"{plan.nodes} node(s) x {plan.per_node}")


def describe_layout(nodes_of_ranks: list[str]) -> str:
    """``node id: ranks`` per node, in rank order."""
    ranks: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes_of_ranks):
        ranks.setdefault(node, []).append(rank)
    return "; ".join(f"node {n[:12]}: rank(s) {','.join(map(str, r))}" for n, r in ranks.items())


def cluster_plan(nodes: int, per_node: int, device: str = "auto") -> TrainPlan:
    """``plan_train`` for the connected cluster (nodes up now and the autoscaler's node types)."""
    import ray

    from cluster.raycluster import autoscaler_node_types

    rows = ray.nodes()
    refuse_failed_nodes(rows, "training")
    alive = [n["Resources"] for n in rows if n.get("Alive")]
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
    try:
        return ray.get(fit.remote(to_dict(cfg), plan, uuid.uuid4().hex[:16], hooks))
    except ray.exceptions.RayError as exc:  # a worker's node failed its start-up check: that message, once
        found = node_check_error(exc)
        if found is None:
            raise
        raise found from None
