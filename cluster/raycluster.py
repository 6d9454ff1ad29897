"""Attach to a Ray cluster (or start a local one), decide CPU or GPU for a stage, run its actors.

``connect()`` attaches to a running cluster when there is one (``RAY_ADDRESS`` set, or a local
cluster started with ``ray start`` / ``ray up``, found through its address file) and otherwise
starts a private local Ray for the job; it returns True when it started Ray. ``started_here()`` says,
on any later call, whether this process started the local Ray it is connected to (``connect`` did, or a
plain ``ray.init()`` that started one, as tests do): only then do all workers share this machine's disk,
so the launchers treat every output as shared storage otherwise (``cluster.preflight.check(...,
shared=not started_here())``). ``cluster.ray_train`` connects through the same ``connect``.

``plan_actors`` (pure) turns a stage's device setting into ``(count, ray options, device)``. A GPU
stage asks for ``num_gpus=1`` per actor even when no GPU node is up yet: the pending actors are the
resource demand that makes Ray's autoscaler start GPU workers. ``auto`` means GPU whenever the
cluster has GPUs now or its autoscaler may add GPU node types (``autoscaler_node_types``).

``ActorGroup`` is the one way the three Ray stages (depth, mining, evaluation) run actors. Failure
handling is Ray's own: actors are created with ``max_restarts`` and ``max_task_retries``, so an
actor that crashes or loses its node is restarted (same constructor arguments) and the calls that
were running on it are resubmitted by Ray; stage calls are idempotent (each writes its own output
atomically). ``map`` only hands calls to actors as they become ready and free (at most
``in_flight`` each), so work never waits on an actor the cluster cannot place yet.

The node's start-up check (``ray_cluster.yaml``: NVIDIA driver, the lock's packages) never fails a node's setup,
which would make the autoscaler relaunch the same broken node in a loop: it writes its message to the node's check
file and the node joins Ray labelled ``depthg/node-check=failed``. ``check_node()`` is the one reader: every GPU
actor's constructor (depth, mining, evaluation, segmentation) and every Ray Train worker call it first and raise
``NodeCheckError`` with the message. A constructor's error is never retried by Ray (the actor is dead, whatever
its ``max_restarts``), and ``ActorGroup.map`` ends the stage with that one error (``node_check_error`` finds it
inside Ray's wrapping); ``cluster.ray_train`` stops the Train run for it without a retry. ``ActorGroup.start`` and
``cluster.ray_train.cluster_plan`` refuse to start while a labelled node is alive (``refuse_failed_nodes``).
"""
from __future__ import annotations

import logging
import os
import re
from collections import deque
from typing import Callable, Iterable

from depthg.errors import DepthgError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# storage settings the driver forwards to its actors (actors of an already running cluster do not
# see the driver's environment) through the actor's runtime_env. No credentials: the runtime env is
# shown in the Ray dashboard; actors of a local Ray inherit the keys from the raylet's environment,
# on a cluster they come from the instance role or the credentials file named here.
STORAGE_ENV = ("DEPTHG_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
MAX_RESTARTS = 3  # Ray restarts a dead actor (crash, lost node) this often ...
MAX_TASK_RETRIES = -1  # ... and resubmits the calls that were running on it until it is dead for good
CPU_ACTORS_DEFAULT = 2  # actors on a CPU-only cluster when the config says 0 ("auto")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = ("auto: GPU actors whenever the cluster has GPUs or its autoscaler may add GPU nodes; "
               "cuda: always ask for one GPU per actor; cpu: CPU actors")
log = logging.getLogger(__name__)
_started = False  # connect() started the local Ray (the fallback of started_here where Ray's internals differ)
_END = object()  # the end of a map's calls


def running_cluster_address() -> str | None:
    """Address of a cluster to attach to: RAY_ADDRESS, else the one a local ``ray start`` recorded."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env
    try:  # private helpers, guarded: a Ray without them just starts a local cluster
        from ray._private import services

        recorded = services.find_bootstrap_address(None)
        if recorded and recorded in services.find_gcs_addresses():
            return recorded
    except Exception:  # noqa: BLE001 - no cluster found
        return None
    return None


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; True when this call started a local Ray.

    ``address="local"`` always starts a private local Ray (never attaching to a cluster that a
    ``ray start`` on this machine recorded)."""
    import ray

    global _started
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or running_cluster_address()
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return False
    # actors of a private local cluster must import depthg / cluster from this checkout
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    _started = True
    return True


def started_here() -> bool:
    """True only when this process is connected to a local Ray that it started itself (``connect`` or a
    plain ``ray.init()`` that started one); False when not connected, or connected to a cluster it joined
    (``RAY_ADDRESS``, ``ray up``, a ``ray start`` on this machine, a ``ray.cluster_utils.Cluster``)."""
    import ray

    if not ray.is_initialized():
        return False
    try:  # private (pinned Ray 2.60), guarded: the driver's node object is the head only when it started it
        from ray._private import worker

        return bool(worker._global_node is not None and worker._global_node.head)
    except Exception:  # noqa: BLE001
        return _started


def storage_env() -> dict[str, str]:
    """The driver's storage environment variables that are set (see ``STORAGE_ENV``)."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def node_id() -> str | None:
    """Ray node id of the calling process (actors report it with their results); None outside Ray.

    Never starts or attaches Ray itself (a bare ``ray.get_runtime_context()`` would)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


# ----------------------------------------------------------------------------- the node's start-up check
# ray_cluster.yaml's start-up check (NVIDIA driver, the lock's versions and builds) writes what failed here
# (DEPTHG_NODE_CHECK overrides the path) and starts the node's Ray with this label
NODE_CHECK_FILE = "/mnt/local/depthg-node-check.txt"
NODE_CHECK_ENV = "DEPTHG_NODE_CHECK"
NODE_CHECK_LABEL = "depthg/node-check"
_NODE_CHECK_TEXT = re.compile(r"NodeCheckError: ([^\n]+)")


class NodeCheckError(DepthgError, RuntimeError):
    """The node this process runs on failed its start-up check (``ray_cluster.yaml``): final, never retried."""


def node_check_file() -> str:
    return os.environ.get(NODE_CHECK_ENV) or NODE_CHECK_FILE


def check_node() -> None:
    """Raise ``NodeCheckError`` with the start-up check's message when this node failed it (its check file is not
    empty); nothing on a node without the check (a laptop, a local Ray). The first thing every GPU actor and Ray
    Train worker does: one failure to read, not a generic CUDA error nor a node relaunched in a loop."""
    path = node_check_file()
    try:
        with open(path) as fh:
            found = "; ".join(line.strip() for line in fh if line.strip())
    except OSError:
        return
    if found:
        raise NodeCheckError(f"node {node_id()} failed its start-up check ({path}): {found}. Fix ray_cluster.yaml "
                             "(ImageId) or the lock, then replace the node (`ray down`, or let it idle out)")


def node_check_error(exc: BaseException | None) -> NodeCheckError | None:
    """The ``NodeCheckError`` inside a Ray error (an actor's creation task, a Train worker's or controller's error,
    a task's), or None. Ray keeps the object in some wrappings and only its text in others (``ActorDiedError``)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NodeCheckError):
            return NodeCheckError(*e.args)
        todo += [getattr(e, a, None) for a in ("cause", "_base_exc", "controller_failure", "__cause__")]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    found = _NODE_CHECK_TEXT.search(str(exc)) if exc is not None else None
    return NodeCheckError(found.group(1).strip()) if found else None


def failed_nodes(nodes: list[dict]) -> list[str]:
    """The addresses of the alive nodes (``ray.nodes()`` rows) labelled by a failed start-up check."""
    return [n.get("NodeManagerAddress") or n.get("NodeID", "?") for n in nodes
            if n.get("Alive") and (n.get("Labels") or {}).get(NODE_CHECK_LABEL) == "failed"]


def refuse_failed_nodes(rows: list[dict], what: str) -> None:
    """``NodeCheckError`` naming the alive nodes of ``rows`` (``ray.nodes()``) that failed their start-up check."""
    bad = failed_nodes(rows)
    if bad:
        raise NodeCheckError(f"node(s) {', '.join(bad)} failed their start-up check (ray_cluster.yaml: an NVIDIA "
                             f"driver older than the lock's CUDA needs, or packages other than the lock's; the message "
                             f"is in {NODE_CHECK_FILE} on the node): fix the AMI or the lock and replace the node(s) "
                             f"(`ray down`, or let them idle out) before {what}")


# ----------------------------------------------------------------------------- what the cluster may hold
def node_types_from_config(config: dict) -> list[dict]:
    """``[{"name", "CPU", "GPU", "max_workers"}]`` of an autoscaler config (``ray_cluster.yaml`` form)."""
    cap = int(config.get("max_workers", 0) or 0)
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        res = spec.get("resources") or {}
        count = int(spec.get("max_workers", cap) or 0)
        out.append({"name": name, "CPU": int(res.get("CPU", 0)), "GPU": int(res.get("GPU", 0)),
                    "max_workers": min(count, cap) if cap else count})
    return out


def autoscaler_node_types() -> list[dict] | None:
    """Node types the connected cluster's autoscaler may start, or None when there is no autoscaler.

    Ray's own record first (``get_cluster_config``: autoscaler v2, KubeRay); else the config file of
    the v1 autoscaler (``ray up``) monitoring *this* cluster, read from that monitor process on this
    machine (job drivers run on the head node, where the monitor runs).
    """
    import ray

    try:  # private API (pinned Ray 2.60), guarded: no answer means "no autoscaler known"
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None and config.node_group_configs:
            return [{"name": g.name, "CPU": int(g.resources.get("CPU", 0)), "GPU": int(g.resources.get("GPU", 0)),
                     "max_workers": int(g.max_count)} for g in config.node_group_configs]
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001
        return None
    path = _monitor_config_path(gcs)
    if not path:
        return None
    import yaml

    with open(os.path.expanduser(path)) as fh:
        return node_types_from_config(yaml.safe_load(fh) or {})


def _monitor_config_path(gcs_address: str) -> str | None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info.get("cmdline") or []
        if any(a.endswith("monitor.py") for a in args) and f"--gcs-address={gcs_address}" in args:
            for a in args:
                if a.startswith("--autoscaling-config="):
                    return a.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------- planning (pure)
def resolve_device(device: str, resources: dict, node_types: list[dict] | None) -> str:
    """``auto`` -> ``cuda`` when the cluster has GPUs or its autoscaler may add GPU nodes, else ``cpu``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device != "auto":
        return device
    has_gpu = resources.get("GPU", 0) > 0 or any(t["GPU"] > 0 for t in node_types or [])
    return "cuda" if has_gpu else "cpu"


def _gpu_capacity(resources: dict, node_types: list[dict] | None) -> tuple[int, int]:
    """(GPUs the cluster can reach, CPUs per GPU on a GPU node) from what is up and the autoscaler."""
    gpu_types = [t for t in node_types or [] if t["GPU"] > 0]
    reach = sum(t["GPU"] * max(t["max_workers"], 0) for t in gpu_types)
    gpus = max(int(resources.get("GPU", 0)), reach)
    if gpu_types:
        cpus_per_gpu = min(t["CPU"] // t["GPU"] for t in gpu_types)
    elif resources.get("GPU", 0) > 0:
        cpus_per_gpu = int(resources.get("CPU", 0)) // int(resources["GPU"])
    else:  # no GPU known yet: ask for little, so any GPU node that comes can hold the actor
        cpus_per_gpu = 1
    return gpus, max(cpus_per_gpu, 1)


def plan_actors(resources: dict, num_actors: int = 0, device: str = "auto", cpus_per_actor: int = 0,
                node_types: list[dict] | None = None) -> tuple[int, dict, str]:
    """``(count, ray options, device)`` of a stage's actor pool.

    GPU (``cuda``): one GPU each, ``num_actors`` or one per GPU the cluster can reach (up now or
    addable by the autoscaler); ``cpus_per_actor`` CPUs each, 0 = the GPU nodes' CPUs per GPU.
    CPU: ``num_actors`` or ``CPU_ACTORS_DEFAULT``, never more than the CPUs up now (at least 1), each
    ``cpus_per_actor`` or an equal share.
    """
    device = resolve_device(device, resources, node_types)
    if device == "cuda":
        gpus, cpus_per_gpu = _gpu_capacity(resources, node_types)
        count = max(min(num_actors or gpus, gpus) if gpus else (num_actors or 1), 1)
        return count, {"num_gpus": 1, "num_cpus": cpus_per_actor or cpus_per_gpu}, device
    cpus = int(resources.get("CPU", 0))
    count = max(min(num_actors or CPU_ACTORS_DEFAULT, max(cpus, 1)), 1)
    return count, {"num_gpus": 0, "num_cpus": cpus_per_actor or max(cpus // count, 1)}, device


def actor_resources(num_actors: int = 0, device: str = "auto", cpus_per_actor: int = 0) -> tuple[int, dict, str]:
    """``plan_actors`` for the connected cluster."""
    import ray

    return plan_actors(ray.cluster_resources(), num_actors, device, cpus_per_actor, autoscaler_node_types())


# ----------------------------------------------------------------------------- the actor pool
class ActorGroup:
    """A pool of ``actor_cls`` actors, reusable for several ``map`` rounds (actor start-up, i.e.
    importing torch and building models, is paid once); killed when the ``with`` ends.

    ``options_fn(device, planned options)`` may replace the planned Ray options (the evaluator's
    actors hold no CPU, for example); ``in_flight`` > 1 makes a threaded actor (``max_concurrency``)
    that overlaps calls. Actors get ``threads=`` (torch threads: their CPU share) and ``init_kwargs``
    as keywords.
    """

    def __init__(self, actor_cls, init_args: tuple, num_actors: int = 0, max_actors: int | None = None,
                 threads: int | None = None, device: str = "auto", cpus_per_actor: int = 0,
                 in_flight: int = 1, options_fn: Callable[[str, dict], dict] | None = None,
                 init_kwargs: dict | None = None):
        self.actor_cls, self.init_args, self.init_kwargs = actor_cls, init_args, dict(init_kwargs or {})
        self.num_actors, self.max_actors, self.threads = num_actors, max_actors, threads
        self.device, self.cpus_per_actor, self.in_flight = device, cpus_per_actor, max(int(in_flight), 1)
        self.options_fn = options_fn
        self.actors: list = []
        self.plan: dict = {}

    def start(self, max_actors: int | None = None) -> list:
        import ray

        if self.actors:
            return self.actors
        refuse_failed_nodes(ray.nodes(), f"starting {self.actor_cls.__name__} actors")
        count, options, device = actor_resources(self.num_actors, self.device, self.cpus_per_actor)
        count = max(min([count, *[n for n in (self.max_actors, max_actors) if n]]), 1)
        if self.options_fn is not None:
            options = dict(self.options_fn(device, options))
        threads = self.threads or max(int(options.get("num_cpus", 1)), 1)  # torch threads: the CPU share
        options.update(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
        if self.in_flight > 1:
            options["max_concurrency"] = self.in_flight
        env = storage_env()
        if env:  # beside the variables an options_fn set (tests: the node check's file)
            runtime = dict(options.get("runtime_env") or {})
            options["runtime_env"] = {**runtime, "env_vars": {**(runtime.get("env_vars") or {}), **env}}
        self.plan = {"count": count, "device": device, "threads": threads, "options": options}
        log.info("%s: %d actor(s) on %s, %s", self.actor_cls.__name__, count, device,
                 {k: v for k, v in options.items() if k != "runtime_env"})
        remote_cls = ray.remote(self.actor_cls).options(**options)
        self.actors = [remote_cls.remote(*self.init_args, threads=threads, **self.init_kwargs) for _ in range(count)]
        return self.actors

    def check(self, init_args: tuple) -> "ActorGroup":
        """Raise unless this group was built with ``init_args`` first (e.g. the same config)."""
        if tuple(init_args) != tuple(self.init_args[:len(init_args)]):
            raise ValueError(f"this {self.actor_cls.__name__} group was built for another config; "
                             "build one group per config")
        return self

    def map(self, method: str, calls: Iterable[tuple], desc: str = "", progress: bool = True,
            total: int | None = None):
        """Yield ``actor.method(*call)`` results as they complete, with one driver-side tqdm bar.

        A call goes to an actor once it is ready (placed and constructed) and has a free slot; the
        next call is handed out *before* a result is yielded, so a consumer that pauses (or kills a
        node) always leaves work in flight. ``calls`` may be any iterable (an iterator is consumed only
        as slots free up, so the driver never holds more than the calls in flight); ``total`` is its
        length when it has none (the bar and the actor count; None: as many actors as planned).
        Retries after actor death are Ray's (``MAX_RESTARTS``, ``MAX_TASK_RETRIES``); the error of a
        call that still fails, or of a method that raises, ends the map, and so does an actor whose constructor
        raised (Ray never restarts one): a node's failed start-up check ends it as that ``NodeCheckError``.
        """
        import ray
        from tqdm import tqdm

        if total is None and hasattr(calls, "__len__"):
            total = len(calls)
        if total == 0:
            return
        todo = iter(calls)
        waiting = {actor.__ray_ready__.remote(): actor for actor in self.start(total)}
        idle, running, left = [], {}, [True]
        log.info("%s: %s calls; each goes to an actor once it is placed and free", desc or method,
                 "?" if total is None else total)

        def hand_out():
            while idle and left[0]:
                call = next(todo, _END)
                if call is _END:
                    left[0] = False
                    return
                actor = idle.pop()
                running[getattr(actor, method).remote(*call)] = actor

        with tqdm(total=total, desc=desc, unit="call", disable=not progress) as bar:
            while left[0] or running:
                (ref,), _ = ray.wait([*waiting, *running], num_returns=1)
                if ref in waiting:
                    actor = waiting.pop(ref)
                    try:
                        ray.get(ref)  # raises when the actor cannot be constructed (never restarted by Ray)
                    except ray.exceptions.RayError as exc:  # a node that failed its start-up check: its message
                        found = node_check_error(exc)
                        if found is None:
                            raise
                        raise found from None
                    idle.extend([actor] * self.in_flight)
                    hand_out()
                    continue
                idle.append(running.pop(ref))
                result = ray.get(ref)
                hand_out()
                bar.update(1)
                yield result

    def call(self, method: str, *args):
        """One call on one actor of the pool (the first ready one), with the same retries."""
        return list(self.map(method, [args], progress=False))[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        import ray

        if self.actors and callable(getattr(self.actor_cls, "close", None)):
            try:  # let actors remove their local files (ray.kill skips destructors)
                ray.get([actor.close.remote() for actor in self.actors], timeout=60)
            except Exception:  # noqa: BLE001 - best effort; the original error matters more
                pass
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

