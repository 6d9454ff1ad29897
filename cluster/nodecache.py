"""One file cache per node, shared by every mining actor on that node.

Stage 2 reads each depth shard once in the whole cluster (a unit's actor streams its own depth shards,
``cluster.mining``), so depth shards are no longer cached. What every actor of a node needs is the split's
kNN keys (all its features, normalised: N x C float32, 1.5 kB per crop at C = 384): the first actor of a
node that needs them builds one file, the others of that node memory-map the same file (one copy in the
page cache per node, not one per actor):

    {base}/depthg-cache-{job}/{node id}/{name}

``base`` is ``mining.cache_dir``, else ``$DEPTHG_CACHE_DIR`` (ray_cluster.yaml points it at the
instance's NVMe store), else the system temp dir. The first actor builds a file under an exclusive
``flock`` on ``<file>.lock`` into a temporary name and renames it into place; the others wait on the lock
and then use the same file. The job's folder is removed when the actors close (``ActorGroup`` calls
``close``); the node id keeps simulated nodes sharing one machine apart, as real nodes are.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from typing import Callable


def cache_dir(configured: str, job: str, node: str) -> str:
    """The cache folder of ``job`` on ``node`` (see the module docstring for ``base``)."""
    base = configured or os.environ.get("DEPTHG_CACHE_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"depthg-cache-{job}", node)


class NodeCache:
    """Files in ``folder`` (shared across the processes of a node), each built once per node."""

    def __init__(self, folder: str):
        self.folder = folder
        self.built = 0  # files this process built (the others found them built)

    def build(self, name: str, make: Callable[[str], None]) -> str:
        """The path of ``name`` in the cache, calling ``make(temporary path)`` once per node to create it."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, name)
        if os.path.exists(path):
            return path
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if not os.path.exists(path):
                tmp = f"{path}.{os.getpid()}.tmp"
                try:
                    make(tmp)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                self.built += 1
        return path

    def close(self) -> None:
        """Remove this job's cache on this node (every actor of the node may call it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.folder))  # the job's folder, once no node folder is left in it
        except OSError:
            pass
