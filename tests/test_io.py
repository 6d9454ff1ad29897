"""Storage helpers on local disk and on a real S3 server (moto_server)."""
import os

import pytest

from depthg import io


def test_local_atomic_write_and_list(tmp_path):
    url = str(tmp_path / "a" / "b.bin")
    io.write_bytes(url, b"hello")
    assert io.read_bytes(url) == b"hello"
    assert io.listdir(str(tmp_path / "a")) == ["b.bin"]
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]
    io.remove(url)
    assert not io.exists(url)


def test_s3_round_trip(s3, tmp_path):
    url = io.join(s3, "dir", "x.bin")
    io.write_bytes(url, b"payload")
    assert io.exists(url)
    assert io.read_bytes(url) == b"payload"
    local = tmp_path / "f.bin"
    local.write_bytes(b"file")
    io.put_file(str(local), io.join(s3, "dir", "f.bin"))
    assert io.listdir(io.join(s3, "dir")) == ["f.bin", "x.bin"]


def test_missing_local_file_named(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.read_bytes(str(tmp_path / "missing.bin"))
