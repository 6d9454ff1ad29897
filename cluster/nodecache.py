"""One depth-shard cache per node, shared by every mining actor on that node.

A unit's anchors come from effectively random depth shards (the global shuffle: one unit of 320 anchors
touches ~34% of COCO's 776 shards, the several units of a node together nearly all), so each node needs
nearly all of stage 1. A cache per *actor* copied it
once per actor (16 x ~40 GB per g5.12xlarge node); this one copies each shard once per node:

    {base}/depthg-cache-{job}/{node id}/{sha1(url)[:16]}.tar

``base`` is ``mining.cache_dir``, else ``$DEPTHG_CACHE_DIR`` (ray_cluster.yaml points it at the
instance's NVMe store), else the system temp dir. The first actor that needs a shard downloads it
under an exclusive ``flock`` on ``<file>.lock`` to a temporary name and renames it into place; the
others wait on the lock and then read the same file. Members are read by tar offset. Local shard
roots are read in place. The job's folder is removed when the actors close (``ActorGroup`` calls
``close``); the node id keeps simulated nodes sharing one machine apart, as real nodes are.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tarfile
import tempfile

from depthg import io


def cache_dir(configured: str, job: str, node: str) -> str:
    """The cache folder of ``job`` on ``node`` (see the module docstring for ``base``)."""
    base = configured or os.environ.get("DEPTHG_CACHE_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"depthg-cache-{job}", node)


class NodeShardCache:
    """Local copies of remote shards in ``folder`` (shared across processes), read by member offset."""

    def __init__(self, folder: str):
        self.folder = folder
        self.index: dict[str, tuple[str, dict]] = {}
        self.fetched_bytes = 0  # bytes this process downloaded (the others found the file cached)

    def local(self, url: str) -> str:
        """A local path holding ``url``'s bytes, downloading it once per node."""
        if not io.is_remote(url):
            return url
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, hashlib.sha1(url.encode()).hexdigest()[:16] + ".tar")
        if os.path.exists(path):
            return path
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if not os.path.exists(path):
                tmp = f"{path}.{os.getpid()}.tmp"
                with io.open_url(url, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                self.fetched_bytes += os.path.getsize(tmp)
                os.replace(tmp, path)
        return path

    def members(self, url: str) -> tuple[str, dict]:
        if url not in self.index:
            path = self.local(url)
            with tarfile.open(path, "r:") as tar:
                offsets = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isreg()}
            self.index[url] = (path, offsets)
        return self.index[url]

    def read(self, url: str, member: str) -> bytes:
        path, offsets = self.members(url)
        if member not in offsets:
            raise KeyError(f"{url} has no member {member}")
        offset, size = offsets[member]
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def close(self) -> None:
        """Remove this job's cache on this node (every actor of the node may call it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.folder))  # the job's folder, once no node folder is left in it
        except OSError:
            pass
        self.index.clear()
