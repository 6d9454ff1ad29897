"""Multi-node Ray clusters emulated on one machine, for tests and benchmarks (never for real jobs).

* ``private_cluster(nodes)``: a ``ray.cluster_utils.Cluster`` (one raylet per node, logical GPUs
  declared per node) that this process connects to. Its temp dir is private (``RAY_TMPDIR`` set
  for the cluster's lifetime), so the address file it writes is not the machine's
  ``/tmp/ray/ray_current_cluster`` that other processes' ``ray.init()`` would connect to.
* ``FakeAutoscaler``: ``ray start --head --autoscaling-config=FILE`` with Ray's ``fake_multinode``
  provider (``RAY_FAKE_CLUSTER=1``): a head and worker node types, and the autoscaler adds fake
  worker nodes (local raylets) when actors ask for resources. It has its own ``--temp-dir`` and
  ports and runs in its own session; ``stop()`` ends exactly the processes of that session
  (never ``ray stop``, which would stop every Ray on the machine).

All nodes share this machine's IP; Ray node ids tell them apart (Ray Train's node rank does not).
The fake autoscaler's processes and its drivers (``env()``) run with Ray's token authentication
disabled (a loopback test cluster); ``private_cluster`` keeps the calling process's mode.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import yaml

from cluster.world import patched_environ

AUTH_OFF = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _short_tmp(prefix: str) -> str:
    # Ray's socket paths live under the temp dir and must stay short (AF_UNIX: 107 bytes)
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@contextlib.contextmanager
def private_cluster(nodes: list[dict], pythonpath: str = "", runtime_env: dict | None = None, connect: bool = True):
    """Start ``nodes`` (``{"num_cpus", "num_gpus", ...}``, the first is the head), connect this
    process (with the job's ``runtime_env``) unless ``connect=False`` (drivers in other processes, given
    ``cluster.address`` and started inside the block, which sets ``RAY_TMPDIR``), yield the ``Cluster``;
    shut everything down afterwards. Connecting needs a process without Ray initialised."""
    import ray
    from ray.cluster_utils import Cluster

    if connect and ray.is_initialized():
        raise RuntimeError("private_cluster: this process is already connected to a Ray")
    tmp = _short_tmp("dg-ray-")
    # authentication is left as this process has it: Ray read RAY_AUTH_MODE when it was imported, and a
    # cluster started from here with another mode would refuse this driver
    env = {"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p)
    cluster = None
    try:
        with patched_environ(env):
            try:
                cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **nodes[0]})
                for node in nodes[1:]:
                    cluster.add_node(**node)
                cluster.wait_for_nodes(timeout=180)
                if connect:
                    ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env)
                yield cluster
            finally:
                if connect:
                    ray.shutdown()
                if cluster is not None:
                    cluster.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def node_of(cluster, node_id: str):
    """The ``ray._private.node.Node`` of ``cluster`` with this Ray node id."""
    for node in cluster.list_all_nodes():
        if node.node_id == node_id:
            return node
    raise KeyError(f"no node {node_id} in this cluster")


class FakeAutoscaler:
    """A head node plus Ray's fake-multinode autoscaler, each worker type a dict of resources.

        with FakeAutoscaler({"gpu": {"CPU": 1, "GPU": 1, "max_workers": 2}}) as fake:
            subprocess.run([..., "--address", fake.address], env=fake.env())
    """

    def __init__(self, worker_types: dict[str, dict], head: dict | None = None, max_workers: int = 0,
                 pythonpath: str = ""):
        import ray._private.services as services

        self.ip = services.get_node_ip_address()
        self.port = free_port()
        self.address = f"{self.ip}:{self.port}"
        self.temp_dir = _short_tmp("dg-fake-")
        self.pythonpath = pythonpath
        head = dict(head or {"CPU": 0})
        types = {"ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0}}
        for name, spec in worker_types.items():
            spec = dict(spec)
            count = int(spec.pop("max_workers", 1))
            types[name] = {"resources": spec, "node_config": {}, "min_workers": 0, "max_workers": count}
        self.config = {
            "cluster_name": "depthg-fake", "max_workers": max_workers or sum(t.get("max_workers", 0) for t in types.values()),
            "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "head_node_type": "ray.head.default", "available_node_types": types,
            "auth": {"ssh_user": "ubuntu"}, "file_mounts": {}, "cluster_synced_files": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }
        self.config_path = os.path.join(self.temp_dir, "autoscaling.yaml")
        self.session: int | None = None

    def env(self) -> dict[str, str]:
        """Environment for the head and for drivers that connect to it."""
        path = os.pathsep.join(p for p in (self.pythonpath, os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, **AUTH_OFF, "PYTHONPATH": path}

    def start(self) -> "FakeAutoscaler":
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(self.config, fh)
        head = self.config["available_node_types"]["ray.head.default"]["resources"]
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
               f"--port={self.port}", f"--node-ip-address={self.ip}", f"--temp-dir={self.temp_dir}",
               f"--autoscaling-config={self.config_path}", f"--num-cpus={int(head.get('CPU', 0))}",
               f"--num-gpus={int(head.get('GPU', 0))}", "--include-dashboard=false",
               f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}"]
        env = {**self.env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        # its own session: every process of this cluster (head, monitor, fake nodes, workers) is in it
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self.session = proc.pid  # the session id of a session leader is its pid
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed ({proc.returncode}): {err[-2000:]}")
        return self

    def processes(self) -> list:
        """This cluster's processes: those of its session, plus any that name its temp dir."""
        import psutil

        out = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                ours = os.getsid(proc.pid) == self.session or any(
                    self.temp_dir in a for a in proc.info.get("cmdline") or [])
            except (ProcessLookupError, PermissionError):
                continue
            if ours and proc.pid != os.getpid():
                out.append(proc)
        return out

    def stop(self) -> None:
        import psutil

        procs = self.processes() if self.session is not None else []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:  # gcs_server and raylets can outlive SIGTERM
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=15)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
