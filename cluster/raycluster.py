"""Attach to a Ray cluster (or start a local one) and size actor pools to it.

``connect()`` attaches to a running cluster when there is one (``RAY_ADDRESS`` set, or a local
cluster started with ``ray start`` / ``ray up``, found through its address file) and otherwise
starts a private local Ray for the job; it returns True when it started Ray, so the job can shut it
down again. ``actor_resources(n)`` decides how many actors to run and what each asks for: one GPU
per actor where the cluster has GPUs, otherwise an equal share of the CPUs each.
"""
from __future__ import annotations

import logging
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# storage settings the driver forwards to its actors (actors of an already running cluster do not
# see the driver's environment) through the actor's runtime_env. No credentials: the runtime env is
# shown in the Ray dashboard; actors of a local Ray inherit the keys from the raylet's environment,
# on a cluster they come from the instance role or the credentials file named here.
STORAGE_ENV = ("DEPTHG_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
MAX_CALL_RETRIES = 3  # resubmissions of one call after its actor died
log = logging.getLogger(__name__)
CPU_ACTORS_DEFAULT = 2  # actors on a CPU-only cluster when the config says 0 ("auto")


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
    """Make sure this process is connected to Ray; True when this call started a local Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or running_cluster_address()
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # actors of a private local cluster must import depthg / cluster from this checkout
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return True


def storage_env() -> dict[str, str]:
    """The driver's storage environment variables that are set (see ``STORAGE_ENV``)."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def actor_resources(num_actors: int = 0) -> tuple[int, dict]:
    """``(count, ray options)`` for the connected cluster (see ``plan_actors``)."""
    import ray

    return plan_actors(ray.cluster_resources(), num_actors)


def plan_actors(resources: dict, num_actors: int = 0) -> tuple[int, dict]:
    """One GPU per actor on a GPU cluster, an equal CPU share otherwise (pure).

    ``num_actors`` 0 means one per GPU (or ``CPU_ACTORS_DEFAULT`` without GPUs); the count never
    exceeds what the cluster can place at once.
    """
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus > 0:
        count = max(min(num_actors or gpus, gpus), 1)
        return count, {"num_gpus": 1, "num_cpus": 1 if cpus >= count else 0}
    count = max(min(num_actors or CPU_ACTORS_DEFAULT, max(cpus, 1)), 1)
    return count, {"num_gpus": 0, "num_cpus": max(cpus // count, 1)}


class ActorGroup:
    """A pool of ``actor_cls`` actors sized by ``actor_resources``; reusable for several ``map``
    rounds (actor start-up, i.e. importing torch and building models, is paid once). The actors
    start on the first ``map`` (at most one per call of it) and are killed when the ``with`` ends."""

    def __init__(self, actor_cls, init_args: tuple, num_actors: int = 0, max_actors: int | None = None,
                 threads: int | None = None):
        self.actor_cls, self.init_args = actor_cls, init_args
        self.num_actors, self.max_actors, self.threads = num_actors, max_actors, threads
        self.actors: list = []

    def start(self, max_actors: int | None = None) -> list:
        import ray

        if self.actors:
            return self.actors
        count, options = actor_resources(self.num_actors)
        limits = [n for n in (self.max_actors, max_actors) if n]
        count = max(min([count, *limits]), 1)
        threads = self.threads or max(int(options.get("num_cpus", 1)), 1)  # torch threads: the CPU share
        env = storage_env()
        if env:
            options["runtime_env"] = {"env_vars": env}
        self._spawn_args = (ray.remote(self.actor_cls), options, threads)
        self.actors = [self._spawn() for _ in range(count)]
        return self.actors

    def _spawn(self):
        remote_cls, options, threads = self._spawn_args
        return remote_cls.options(**options).remote(*self.init_args, threads=threads)

    def _replace(self, dead):
        """A fresh actor in the place of ``dead`` (killed, crashed, or its node lost)."""
        import ray

        ray.kill(dead)  # no-op when it is already gone
        fresh = self._spawn()
        self.actors = [fresh if a is dead else a for a in self.actors]
        return fresh

    def check(self, init_args: tuple) -> "ActorGroup":
        """Raise unless this group was built with ``init_args`` (e.g. the same config)."""
        if tuple(init_args) != tuple(self.init_args):
            raise ValueError(f"this {self.actor_cls.__name__} group was built for another config; "
                             "build one group per config")
        return self

    def map(self, method: str, calls: list[tuple], desc: str = "", progress: bool = True):
        """Yield ``actor.method(*call)`` results as they complete, with one driver-side tqdm bar.

        An actor that dies (``ray.kill``, a crash, a lost node) is replaced by a fresh one and its call
        is resubmitted, at most ``MAX_CALL_RETRIES`` times per call: the calls are idempotent (each
        writes its own shard atomically), so every unit still lands exactly once. Exceptions raised
        by the method itself are not retried.
        """
        import ray
        from ray.exceptions import RayActorError
        from tqdm import tqdm

        if not calls:
            return
        idle, todo = list(self.start(len(calls))), list(enumerate(calls))[::-1]
        running: dict = {}
        retries = [0] * len(calls)
        with tqdm(total=len(calls), desc=desc, unit="shard", disable=not progress) as bar:
            while todo or running:
                while idle and todo:
                    actor, (i, call) = idle.pop(), todo.pop()
                    running[getattr(actor, method).remote(*call)] = (actor, i, call)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, i, call = running.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError as exc:
                    retries[i] += 1
                    if retries[i] > MAX_CALL_RETRIES:
                        raise
                    log.warning("%s: actor died during call %d (%s); replacing it and resubmitting the call",
                                desc or method, i, type(exc).__name__)
                    idle.append(self._replace(actor))
                    todo.append((i, call))
                    continue
                idle.append(actor)
                bar.update(1)
                yield result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import ray

        if self.actors and callable(getattr(self.actor_cls, "close", None)):
            try:  # let actors remove their local files (ray.kill skips destructors)
                ray.get([actor.close.remote() for actor in self.actors], timeout=60)
            except Exception:  # noqa: BLE001 - best effort; the original error matters more
                pass
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

