"""Storage: one place that turns a URL (local path or s3://) into bytes, via fsspec.

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object only
becomes visible when its upload completes. So a partial file never appears under its final name.
An S3-compatible endpoint (moto, MinIO) is taken from ``AWS_ENDPOINT_URL`` or
``DEPTHG_S3_ENDPOINT``; credentials come from the usual AWS environment and are never logged.
"""
from __future__ import annotations

import functools
import os
import posixpath
import re
import uuid
from typing import Any, Iterator, Mapping

import fsspec

from depthg.errors import DepthgError


class StorageError(DepthgError, OSError):
    """Storage could not be reached or written; the message names the URL."""


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def storage_options(url: str) -> dict[str, Any]:
    if not str(url).startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {
        # bounded retries, short connect timeout: a dead endpoint fails in seconds, not minutes
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}},
        "skip_instance_cache": False,
    }
    endpoint = os.environ.get("DEPTHG_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def filesystem(url: str):
    """(fs, path) for a URL; raises StorageError naming the URL when it cannot be set up."""
    try:
        return fsspec.core.url_to_fs(str(url), **storage_options(url))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open storage for {url}: {exc}") from exc


def join(url: str, *parts: str) -> str:
    url = str(url)
    if is_remote(url):
        return posixpath.join(url, *parts)
    return os.path.join(url, *parts)


def _wrap(url: str, exc: Exception) -> Exception:
    if isinstance(exc, (FileNotFoundError, StorageError)):
        return exc
    return StorageError(f"storage error at {url}: {type(exc).__name__}: {exc}")


def _call(url: str, action):
    """``action(fs, path)`` on the filesystem of ``url``; any failure rewrapped as a StorageError naming it."""
    fs, path = filesystem(url)
    try:
        return action(fs, path)
    except Exception as exc:  # noqa: BLE001 - rewrapped with the URL
        raise _wrap(url, exc) from exc


def open_url(url: str, mode: str = "rb"):
    return _call(url, lambda fs, path: fs.open(path, mode))


def exists(url: str) -> bool:
    return _call(url, lambda fs, path: fs.exists(path))


def makedirs(url: str) -> None:
    if not is_remote(url):
        os.makedirs(url, exist_ok=True)


def listdir(url: str) -> list[str]:
    """Base names of the entries directly under ``url`` (empty when it does not exist), listed afresh (one paged
    listing on S3: a folder of many files costs one request per 1000, not one per file)."""
    def names(fs, path):
        # ls, not exists() + ls: s3fs's exists() on a bucket root swallows connection errors
        # (an unreachable endpoint would look like an empty folder)
        fs.invalidate_cache(path)  # what the storage holds now, not what this process listed before
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    return _call(url, names)


def read_bytes(url: str) -> bytes:
    return _call(url, lambda fs, path: fs.cat_file(path))


@functools.lru_cache(maxsize=4096)
def _range_fs(url: str, endpoint: str | None, pid: int):
    # keyed by the process too: after a fork (DataLoader workers) fsspec makes fresh instances (its own
    # instance cache checks the pid), so a child never reuses the parent's S3 session and event loop
    return filesystem(url)


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``url`` in ONE exact ranged request (fsspec ``cat_file``): the storage serves
    exactly what is asked for, unlike a file object's read-ahead (s3fs reads 5 MB blocks by default). The
    file system of a URL is looked up once per process (and endpoint): a loader reads many ranges per shard."""
    if end <= start:
        return b""
    endpoint = os.environ.get("DEPTHG_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    fs, path = _range_fs(str(url), endpoint, os.getpid())
    try:
        return fs.cat_file(path, start=int(start), end=int(end))
    except Exception as exc:  # noqa: BLE001 - rewrapped with the URL
        raise _wrap(url, exc) from exc


def _atomic_local(url: str, write) -> None:
    """Run ``write(fh)`` on a temporary file beside ``url``, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(url))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(url)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(url: str, data: bytes) -> None:
    """Atomically write ``data`` to ``url``."""
    if is_remote(url):
        _call(url, lambda fs, path: fs.pipe_file(path, data))
    else:
        _atomic_local(url, lambda fh: fh.write(data))


def put_file(local_path: str, url: str) -> None:
    """Atomically copy a finished local file to ``url`` (rename locally, single upload on S3)."""
    if is_remote(url):
        _call(url, lambda fs, path: fs.put_file(local_path, path))
        return

    def copy(fh):
        with open(local_path, "rb") as src:
            while chunk := src.read(1 << 20):
                fh.write(chunk)

    _atomic_local(url, copy)


def remove(url: str) -> None:
    def rm(fs, path):
        if fs.exists(path):
            fs.rm(path, recursive=True)

    _call(url, rm)


_SECRET = re.compile(r"(key|secret|token|password|credential)", re.I)


def mask_secrets(data: Any) -> Any:
    """Replace values of secret-looking keys and credentials embedded in URLs."""
    if isinstance(data, Mapping):
        return {k: ("***" if _SECRET.search(str(k)) and v else mask_secrets(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_secrets(v) for v in data]
    if isinstance(data, str):
        return re.sub(r"(://)[^/@\s]+:[^/@\s]+@", r"\1***:***@", data)
    return data


def find(url: str) -> list[str]:
    """Every file under the folder ``url`` (recursively), or matching ``url`` when it holds a glob pattern
    (``*``, ``?``, ``[``), as full URLs in sorted order (local paths stay plain paths)."""
    def files(fs, path):
        if any(c in path for c in "*?["):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
        else:
            found = fs.find(path)
        return sorted(fs.unstrip_protocol(p) if is_remote(url) else p for p in found)

    return _call(url, files)


def iter_s3_keys(url: str, page: int = 1000) -> Iterator[str] | None:
    """The object URLs below the S3 folder ``url``, one listing page (``page`` keys) at a time in key order (S3 lists
    keys in UTF-8 byte order: the order of Python strings); None when ``url`` is not on s3fs (the caller then lists
    everything at once with ``find``)."""
    fs, path = filesystem(url)
    call = getattr(fs, "_call_s3", None)  # s3fs's one request with its retries (pinned s3fs; guarded)
    if call is None or "s3" not in tuple(getattr(fs, "protocol", ())):
        return None
    from fsspec.asyn import sync

    bucket, _, prefix = path.strip("/").partition("/")
    kwargs = {"Bucket": bucket, "Prefix": prefix + "/" if prefix else "", "MaxKeys": int(page),
              **getattr(fs, "req_kw", {})}

    def pages():
        while True:
            try:
                page = sync(fs.loop, call, "list_objects_v2", **kwargs)
            except Exception as exc:  # noqa: BLE001 - rewrapped with the URL, as every call here is
                raise _wrap(url, exc) from exc
            for item in page.get("Contents", []):
                yield f"s3://{bucket}/{item['Key']}"
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    return pages()
