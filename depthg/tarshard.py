"""The tar container of shards: a sample's members in a fixed order, deterministic writing, and byte ranges
read back (writer and reader side by side; the content contract is ``depthg.shards``').

``write_shard`` stores each sample's members ``rgb.*``, ``depth.*``, then the rest sorted (``member_order``),
as plain ustar members with mtime 0, mode 0444 and owner ``bigdata`` (webdataset's ``TarWriter`` settings),
so the same samples give the same bytes and a positive's rgb + depth are one contiguous prefix of its sample.
``sample_offsets`` gives each sample's first byte and where its rgb + depth end (the sidecars' ``offsets`` and
``prefix``). ``parse_samples`` turns the bytes of a range that starts at a sample into the raw dicts
``wds.WebDataset`` yields (its own ustar parser on the loader's hot path, webdataset's reader otherwise).
"""
from __future__ import annotations

import io as _pyio
import tarfile
from typing import Iterable, Iterator

from depthg.codecs import ShardError

_FIRST = {"rgb": 0, "depth": 1}  # members stored first in a sample, in this order (a positive's read)
_BLOCK = 512


def member_order(sample: dict) -> list[str]:
    """The order a shard stores a sample's members: ``rgb.*``, ``depth.*``, then the rest sorted."""
    names = [k for k in sample if not k.startswith("_")]
    return sorted(names, key=lambda k: (_FIRST.get(k.split(".", 1)[0], len(_FIRST)), k))


def write_shard(local_path: str, samples: Iterable[dict]) -> int:
    """Write encoded samples to a local tar file (deterministic bytes, ``member_order``); returns the count."""
    count = 0
    with open(local_path, "wb") as fh, tarfile.open(fileobj=fh, mode="w|") as tar:
        for sample in samples:
            for name in member_order(sample):
                data = sample[name]
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise ShardError(f"sample {sample.get('__key__')}: member {name} is {type(data).__name__}, not bytes")
                info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
                tar.addfile(info, _pyio.BytesIO(data))
            count += 1
    return count


def parse_samples(data: bytes, url: str = "?", truncated: bool = False) -> Iterator[dict]:
    """Raw sample dicts of tar bytes that start at a sample (a range read), the dicts ``wds.WebDataset`` yields
    (``__key__``, ``__url__``, one bytes value per member). ``truncated``: the range came back short, so its
    last sample may lack members and is dropped. Plain ustar members are parsed here (a range is small and
    this is the loader's hot path); a range with other member types goes through webdataset's reader."""
    samples, error, last_whole = _parse_ustar(data, url)
    if samples is None:  # pax / GNU long-name members: webdataset's (tarfile's) general reader
        from webdataset import tariterators

        samples = list(tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream":
                                                                                  _pyio.BytesIO(data)}])))
    yield from samples[:-1] if (truncated or not last_whole) and samples else samples
    if error:
        raise ShardError(error)


def _parse_ustar(data: bytes, url: str) -> tuple[list[dict] | None, str | None, bool]:
    """``(samples, error, whether the last sample is whole)`` of plain ustar members (``samples`` None: another
    member type is there). A sample is whole unless the parse broke inside it or at an unreadable header."""
    out: list[dict] = []
    pos, n, view = 0, len(data), memoryview(data)
    while pos + _BLOCK <= n:
        hdr = data[pos:pos + _BLOCK]
        if hdr.count(0) == _BLOCK:  # end-of-archive
            break
        try:
            ok = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"-1", 8) == sum(hdr) - sum(hdr[148:156]) + 256
            size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            ok = False
        if not ok:
            return out, f"{url}: no tar header at byte {pos} of the range read", False
        if hdr[156] not in (0, 0x30):
            return None, None, True
        name = hdr[:100].split(b"\0", 1)[0].decode()
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0].decode() + "/" + name
        start = pos + _BLOCK
        folder, base = name.rsplit("/", 1) if "/" in name else ("", name)
        key, ext = (base.split(".", 1) + [""])[:2]
        key = f"{folder}/{key}" if folder else key
        if start + size > n:
            whole = not out or out[-1]["__key__"] != key
            return out, f"{url}: member {name} cut after {n - start} of its {size} bytes", whole
        if not out or out[-1]["__key__"] != key:
            out.append({"__key__": key, "__url__": url})
        out[-1][ext.lower()] = bytes(view[start:start + size])
        pos = start + -(-size // _BLOCK) * _BLOCK
    return out, None, True


def sample_offsets(local_path: str) -> tuple[list[int], list[int]]:
    """``(offsets, prefix)`` of a local shard: each sample's first tar header offset, then the end of the last
    (count + 1); and where each sample's ``rgb.*`` + ``depth.*`` members end (``member_order`` stores them first)."""
    offsets, prefix, last = [], [], None
    with tarfile.open(local_path, "r:") as tar:
        for m in tar.getmembers():
            key, suffix = (m.name.split(".", 1) + [""])[:2]
            if key != last:
                offsets.append(m.offset)
                prefix.append(m.offset)
                last = key
            if suffix.split(".", 1)[0] in _FIRST:
                prefix[-1] = m.offset_data + -(-m.size // _BLOCK) * _BLOCK
        offsets.append(tar.offset)  # after the last member's data: where the end-of-archive blocks start
    return offsets, prefix
