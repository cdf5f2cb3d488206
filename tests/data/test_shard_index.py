"""The webdataset shard index: built once beside the shards, reused, rebuilt when a shard
changes, read only for a process's own shards; shards listed and read from gs://."""
import io
import json
import os
import tarfile
import weakref

import numpy as np
import pytest
from etils import epath

from unclip_jax import paths
from unclip_jax.data import shard_index, sources


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
    real = shard_index.scan_tar
    monkeypatch.setattr(shard_index, "scan_tar", lambda p: scans.append(p) or real(p))
    pattern = str(tmp_path / "s-*.tar")
    p1 = sources.WebDatasetSource(pattern, 1, 2)
    assert _captions(p1) == [f"caption {i}" for i in (3, 4, 5, 9, 10, 11)]
    # Process 1 of 2 indexed its own shards (1 and 3) only, and stored their indexes.
    assert sorted(os.path.basename(p) for p in scans) == ["s-1.tar", "s-3.tar"]
    assert sorted(p.name for p in tmp_path.glob("*.index.npy")) == [
        "s-1.tar.index.npy", "s-3.tar.index.npy"]
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
    assert list(tmp_path.glob("*.index.npy")) == [tmp_path / "s-2.tar.index.npy"]


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
    assert epath.Path(f"{bucket}/shards/s-1.tar.index.npy").exists()
    assert epath.Path(f"{bucket}/shards/{shard_index.SUMMARY_NAME}").exists()
    # A later start: each stored index is opened by its head and single rows (ranged reads),
    # never read whole; the examples are the same.
    want = [src[i] for i in range(6)]
    reads, real = [], paths.read_range
    monkeypatch.setattr(paths, "read_range", lambda p, a, n: reads.append((p, n)) or real(p, a, n))
    again = sources.WebDatasetSource(f"{bucket}/shards/*.tar", 0, 1)
    assert [again[i] for i in range(6)] == want
    # Per shard: its head, its last row (checked when opened), then one row per example.
    index_reads = sorted(n for p, n in reads if p.endswith(".index.npy"))
    assert index_reads == [shard_index.ROW_BYTES] * (2 + 6) + [shard_index.HEAD_BYTES] * 2
    assert os.listdir(tmp_path) == []  # nothing under a local "gs:" folder


# ------------------------------------------------------------- the stored index, compact form
def _odd_shard(path):
    """Keys with every mix of members: no txt (json caption), no image, an image twice,
    a sub-folder, a member type the reader ignores."""
    members = [("a/000.jpg", b"J" * 7), ("a/000.txt", b"cap 0"), ("a/000.json", b"{}"),
               ("a/001.png", b"P" * 9), ("a/001.json", b'{"caption": "cap 1"}'),
               ("a/002.txt", b"no image"), ("a/002.cls", b"3"),
               ("b/003.webp", b"W" * 5), ("b/003.jpeg", b"X" * 4), ("b/003.txt", b"cap 3")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _reference_scan(path):
    """Rows [(image at, n), (txt at, n), (json at, n)] per key, from tarfile's own listing."""
    rows = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            row = rows.setdefault(key, [-1] * 6)
            kind = "image" if ext in ("jpg", "jpeg", "png", "webp") else ext
            if kind in ("image", "txt", "json") and (kind != "image" or row[0] < 0):
                j = 2 * ("image", "txt", "json").index(kind)
                row[j:j + 2] = [m.offset_data, m.size]
    return list(rows.values())


def test_stored_index_equals_a_fresh_scan_and_reads_the_members(tmp_path):
    shard = str(tmp_path / "s.tar")
    _odd_shard(shard)
    rows = shard_index.load(shard)
    assert rows.tolist() == _reference_scan(shard)
    stored = np.load(shard + shard_index.INDEX_SUFFIX)
    st = epath.Path(shard).stat()   # the shard version the index is valid for
    assert stored.dtype == np.int64 and stored.shape == (5, 6)
    assert stored[0, :4].tolist() == [shard_index.MAGIC, st.length,
                                      int(np.float64(st.mtime).view(np.int64)), 4]
    assert stored[1:].tolist() == rows.tolist()
    src = sources.WebDatasetSource(shard, 0, 1)
    got = [(r["image"], r["caption"], r.get("missing")) for r in (src[i] for i in range(4))]
    assert got == [(b"J" * 7, "cap 0", None), (b"P" * 9, "cap 1", None),
                   (None, "no image", "no_image"), (b"W" * 5, "cap 3", None)]


def test_stale_corrupt_and_earlier_format_indexes(tmp_path, monkeypatch, caplog):
    shard = str(tmp_path / "s.tar")
    index = shard + shard_index.INDEX_SUFFIX
    (tmp_path / "s.tar").write_bytes(_shard(3, 0))
    first = shard_index.load(shard).copy()
    # The shard rewritten (other examples, a later mtime): the index is rebuilt and stored.
    (tmp_path / "s.tar").write_bytes(_shard(5, 10))
    later = os.stat(shard).st_mtime + 5
    os.utime(shard, (later, later))
    rows = shard_index.load(shard)
    assert len(first) == 3 and rows.tolist() == _reference_scan(shard) and len(rows) == 5
    st = epath.Path(shard).stat()
    assert np.load(index)[0, 1:4].tolist() == [
        st.length, int(np.float64(st.mtime).view(np.int64)), 5]
    # A corrupt index (not numpy; a truncated one; an array of another shape) is rebuilt with
    # a warning naming it.
    good = open(index, "rb").read()
    for bad in (b"garbage", good[:-20], None, 0):
        if bad is None:
            np.save(index, np.zeros((3, 2), np.int64))
        elif bad == 0:
            np.save(index, np.int64(7))
        else:
            open(index, "wb").write(bad)
        caplog.clear()
        assert shard_index.load(shard, mmap=bad is not None).tolist() == rows.tolist()
        assert open(index, "rb").read() == good
        assert f"the index {index} is unreadable" in caplog.text
    # The earlier JSON index, still valid, is converted without a scan of the tar; a stale
    # one is not used.
    os.remove(index)
    ex = [{"key": str(i), "image": list(r[:2]), "txt": list(r[2:4])} for i, r in
          enumerate(rows.tolist())]
    (tmp_path / "s.tar.index.json").write_text(json.dumps(
        {"size": st.length, "mtime": st.mtime, "examples": ex}))
    monkeypatch.setattr(shard_index, "scan_tar", lambda p: pytest.fail("scanned"))
    assert shard_index.load(shard).tolist() == rows.tolist()
    assert open(index, "rb").read() == good
    os.remove(index)
    (tmp_path / "s.tar.index.json").write_text(json.dumps(
        {"size": st.length, "mtime": st.mtime - 1, "examples": ex[:1]}))
    with pytest.raises(pytest.fail.Exception, match="scanned"):
        shard_index.load(shard)


def test_start_reads_one_summary_and_reads_rows_alone(tmp_path, monkeypatch):
    n_shards, per = 12, 3
    for s in range(n_shards):
        (tmp_path / f"s-{s:02d}.tar").write_bytes(_shard(per, per * s))
    pattern = str(tmp_path / "s-*.tar")
    assert len(sources.WebDatasetSource(pattern, 0, 1)) == n_shards * per  # indexes built
    summary = np.load(tmp_path / shard_index.SUMMARY_NAME)
    assert summary["name"].tolist() == [f"s-{s:02d}.tar" for s in range(n_shards)]
    assert summary["count"].tolist() == [per] * n_shards
    # A later start counts the examples from the summary: no shard index opened.
    opened, alive, rows_read = [], [], []
    real_open, real_row = shard_index.open_index, shard_index.read_row

    def open_index(path, *a, **k):
        rows, at = real_open(path, *a, **k)
        opened.append(os.path.basename(path))
        alive.append(weakref.ref(rows))
        return rows, at
    monkeypatch.setattr(shard_index, "open_index", open_index)
    monkeypatch.setattr(shard_index, "read_row",
                        lambda path, at, k: rows_read.append(k) or real_row(path, at, k))
    src = sources.WebDatasetSource(pattern, 0, 1, cache_shards=3)
    assert len(src) == n_shards * per and opened == []
    # Random reads over every shard: each shard's index opened (and checked) once, its later
    # examples read as rows alone, no index held.
    order = np.random.default_rng(0).permutation(n_shards * per)
    for i in order:
        assert src[int(i)]["caption"] == f"caption {i}"
        assert sum(r() is not None for r in alive) == 0
    assert sorted(opened) == sorted(set(opened)) and len(opened) == n_shards
    assert len(rows_read) == n_shards * (per - 1)
    # A damaged summary is rebuilt from the indexes (not from the tars).
    (tmp_path / shard_index.SUMMARY_NAME).write_bytes(b"not a zip")
    monkeypatch.setattr(shard_index, "scan_tar", lambda p: pytest.fail("scanned"))
    assert len(sources.WebDatasetSource(pattern, 1, 2)) == n_shards * per // 2
    summary = np.load(tmp_path / shard_index.SUMMARY_NAME)   # process 1's shards now
    assert summary["name"].tolist() == [f"s-{s:02d}.tar" for s in range(1, n_shards, 2)]
    assert summary["count"].tolist() == [per] * (n_shards // 2)


def test_indexes_that_cannot_be_stored_are_held_within_the_bound(tmp_path, monkeypatch,
                                                                  caplog):
    n_shards, per = 10, 3
    for s in range(n_shards):
        (tmp_path / f"s-{s:02d}.tar").write_bytes(_shard(per, per * s))
    alive = []
    real_open = shard_index.open_index

    def open_index(path, *a, **k):
        rows, at = real_open(path, *a, **k)
        assert at is None
        alive.append(weakref.ref(rows))
        return rows, at
    monkeypatch.setattr(shard_index, "open_index", open_index)

    def read_only(p, data):
        raise PermissionError(f"read-only: {p}")
    monkeypatch.setattr(paths, "write_bytes", read_only)
    monkeypatch.setattr(paths, "save_npz", lambda p, **a: read_only(p, None))
    src = sources.WebDatasetSource(str(tmp_path / "s-*.tar"), 0, 1, cache_shards=3)
    assert len(src) == n_shards * per and "cannot store the index" in caplog.text
    for i in np.random.default_rng(1).permutation(n_shards * per):
        assert src[int(i)]["caption"] == f"caption {i}"
        assert len(src._unstored) <= 3
        # Those dropped are freed at once (nothing else keeps them).
        assert sum(r() is not None for r in alive) <= 3
    assert len(alive) > n_shards   # dropped ones were indexed again
    assert list(tmp_path.glob("*.npy")) == [] and list(tmp_path.glob("*.npz")) == []
