"""The webdataset shard index: built once beside the shards, reused, rebuilt when a shard
changes, read only for a process's own shards; shards listed and read from gs://."""
import io
import os
import tarfile

import pytest
from etils import epath

from unclip_jax.data import sources


def _shard(n, first):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(first, first + n):
            for ext, data in (("png", bytes([i]) * (10 + i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _captions(src):
    return [src[i]["caption"] for i in range(len(src))]


def test_index_is_built_once_and_reused(tmp_path, monkeypatch):
    for s in range(4):
        (tmp_path / f"s-{s}.tar").write_bytes(_shard(3, 3 * s))
    scans = []
    real = sources._index_tar
    monkeypatch.setattr(sources, "_index_tar", lambda p: scans.append(p) or real(p))
    pattern = str(tmp_path / "s-*.tar")
    p1 = sources.WebDatasetSource(pattern, 1, 2)
    assert _captions(p1) == [f"caption {i}" for i in (3, 4, 5, 9, 10, 11)]
    # Process 1 of 2 indexed its own shards (1 and 3) only, and stored their indexes.
    assert sorted(os.path.basename(p) for p in scans) == ["s-1.tar", "s-3.tar"]
    assert sorted(p.name for p in tmp_path.glob("*.index.json")) == [
        "s-1.tar.index.json", "s-3.tar.index.json"]
    # A later start reads the stored index, not the tar headers; the examples are the same.
    scans.clear()
    again = sources.WebDatasetSource(pattern, 1, 2)
    assert _captions(again) == _captions(p1) and scans == []
    # A shard that changed (here: re-downloaded with more examples) is indexed again.
    (tmp_path / "s-3.tar").write_bytes(_shard(4, 9))  # same size (tar pads to 10 KiB)
    later = os.stat(tmp_path / "s-3.tar").st_mtime + 5
    os.utime(tmp_path / "s-3.tar", (later, later))
    assert _captions(sources.WebDatasetSource(pattern, 1, 2))[-4:] == [
        f"caption {i}" for i in (9, 10, 11, 12)]
    assert [os.path.basename(p) for p in scans] == ["s-3.tar"]


def test_read_by_global_index_indexes_only_that_shard(tmp_path):
    for s in range(3):
        (tmp_path / f"s-{s}.tar").write_bytes(_shard(2, 2 * s))
    src = sources.WebDatasetSource(str(tmp_path / "s-*.tar"), 0, 1)  # as join_images opens it
    assert src.read((2 << sources.SHARD_BITS) | 1)["caption"] == "caption 5"
    assert list(tmp_path.glob("*.index.json")) == [tmp_path / "s-2.tar.index.json"]


@pytest.fixture(scope="module")
def bucket():
    from helpers.gcs import emulator
    with emulator() as b:
        yield b


def test_shards_on_gcs(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for s in range(2):
        epath.Path(f"{bucket}/shards/s-{s}.tar").write_bytes(_shard(3, 3 * s))
    src = sources.WebDatasetSource(f"{bucket}/shards/*.tar", 0, 1)
    assert _captions(src) == [f"caption {i}" for i in range(6)]
    assert src[4]["image"] == bytes([4]) * 14
    assert epath.Path(f"{bucket}/shards/s-1.tar.index.json").exists()
    assert os.listdir(tmp_path) == []  # nothing under a local "gs:" folder
