"""The webdataset shard index: where each example's members lie in its tar shard, built once per
shard, stored beside it, and read with a process's memory bounded by the number of shards.

  SHARD.tar.index.npy   int64 [n + 1, 6]: row 0 = (MAGIC, shard size, shard mtime as float64
                        bits, n, 0, 0); row 1 + k = example k's (offset, size) of its image, txt
                        and json members, -1 where absent. Example k is the k-th key in tar order.
  DIR/webdataset_index_summary.npz   per shard of DIR (by file name): size, mtime and example
                        count, so that start-up reads one small file per folder, not every index.

Both are valid while the shard keeps its size and modification time; a stale or unreadable one
is rebuilt (in a read-only folder: in memory at each start, with a warning). A valid index of
the earlier format (SHARD.tar.index.json) is converted, not rescanned.
"""
from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import logging

from unclip_jax import paths

INDEX_SUFFIX = ".index.npy"
JSON_SUFFIX = ".index.json"   # the earlier format, converted when still valid
SUMMARY_NAME = "webdataset_index_summary.npz"
MAGIC = 0x57445358_00000001   # "WDSX", format 1
MEMBERS = ("image", "txt", "json")
ROW_BYTES = 6 * 8
HEAD_BYTES = 4096   # the .npy header and row 0 of an index lie within
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def is_index_file(p: str) -> bool:
    return p.endswith((INDEX_SUFFIX, JSON_SUFFIX)) or os.path.basename(p) == SUMMARY_NAME


def stat(path: str) -> tuple[int, float]:
    st = paths.path(path).stat()
    return int(st.length), float(st.mtime)


def open_shard(path: str):
    return open(path, "rb") if not paths.is_url(path) else paths.path(path).open("rb")


def scan_tar(path: str) -> np.ndarray:
    """The index rows [n, 6] of an img2dataset tar shard, from its tar headers.

    A truncated or damaged shard (an interrupted download) keeps the examples whose members lie
    wholly before the damage, with a warning naming the shard; one that is not a tar at all
    gives none."""
    examples: dict[str, list[int]] = {}   # key -> row, in order of the key's first member
    file_size = stat(path)[0]
    try:
        with open_shard(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile() or m.offset_data + m.size > file_size:
                    continue
                base = os.path.basename(m.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                row = examples.setdefault(os.path.join(os.path.dirname(m.name), stem), [-1] * 6)
                ext = "image" if ext.lower() in IMAGE_EXTS else ext.lower()
                # The first image of a key, its last txt / json.
                if ext in MEMBERS and (ext != "image" or row[0] < 0):
                    j = 2 * MEMBERS.index(ext)
                    row[j:j + 2] = m.offset_data, m.size
    except (tarfile.TarError, EOFError, OSError) as e:
        logging.warning("webdataset shard %s is damaged (%s: %s); using the %d examples before "
                        "the damage", path, type(e).__name__, e, len(examples))
    return np.array(list(examples.values()), np.int64).reshape(-1, 6)


def _mtime_bits(mtime: float) -> int:
    return int(np.float64(mtime).view(np.int64))


def _pack(rows: np.ndarray, size: int, mtime: float) -> np.ndarray:
    head = np.array([[MAGIC, size, _mtime_bits(mtime), len(rows), 0, 0]], np.int64)
    return np.concatenate([head, rows])


def _check(dtype, shape, c_order: bool, row0: np.ndarray, size: int, mtime: float) -> bool:
    """Whether a stored index (its array's dtype, shape, order and row 0) is of this shard
    version; ValueError when the file is not an index."""
    if (dtype != np.dtype("<i8") or len(shape) != 2 or shape[1] != 6 or shape[0] < 1
            or not c_order or len(row0) != 6 or int(row0[0]) != MAGIC
            or int(row0[3]) != shape[0] - 1):
        raise ValueError(f"not a shard index: {dtype} {shape}")
    return int(row0[1]) == size and int(row0[2]) == _mtime_bits(mtime)


class _RemoteRows:
    """The rows of an index on object storage, read one at a time (`read_row`)."""

    def __init__(self, path: str, at: int, n: int):
        self._path, self._at, self._n = path, at, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k: int) -> np.ndarray:
        return np.array(read_row(self._path, self._at, int(k)))


def _from_json(path: str, size: int, mtime: float):
    """The rows of a still-valid index of the earlier JSON format, else None."""
    try:
        stored = json.loads(paths.path(path + JSON_SUFFIX).read_text())
        if stored.get("size") != size or stored.get("mtime") != mtime:
            return None
        rows = np.full((len(stored["examples"]), 6), -1, np.int64)
        for i, ex in enumerate(stored["examples"]):
            for j, m in enumerate(MEMBERS):
                if m in ex:
                    rows[i, 2 * j:2 * j + 2] = ex[m]
        return rows
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _stored(path: str, size: int, mtime: float, lazy: bool):
    """(rows, byte offset of example 0's row in the file) of the stored index of shard `path`
    when it is of this shard version, else (None, None). `lazy`: a local index is memory-mapped;
    one on object storage is not read whole (its head and last row are checked, its rows are
    read one at a time): a shard's index is opened on its first example's read, and the
    training stream's shuffle reads about one example per shard index opened."""
    ip = path + INDEX_SUFFIX
    if lazy and paths.is_url(ip):
        head = paths.read_range(ip, 0, HEAD_BYTES)
        f = io.BytesIO(head)
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                                 np.lib.format.read_array_header_2_0)(f)
        at = f.tell()
        row0 = np.frombuffer(head[at:at + ROW_BYTES], "<i8")
        if not _check(dtype, shape, not fortran, row0, size, mtime):
            return None, None
        n = shape[0] - 1
        if len(paths.read_range(ip, at + n * ROW_BYTES, ROW_BYTES)) != ROW_BYTES:
            raise ValueError(f"truncated: {shape[0]} rows announced")
        return _RemoteRows(path, at + ROW_BYTES, n), at + ROW_BYTES
    if lazy:
        arr = np.load(os.fspath(paths.path(ip)), mmap_mode="r")
        at = int(arr.offset)
    else:
        data = paths.path(ip).read_bytes()
        arr = np.load(io.BytesIO(data))
        at = len(data) - arr.nbytes
    row0 = arr[0] if arr.ndim == 2 and len(arr) else np.zeros(0)
    if not _check(arr.dtype, arr.shape, arr.flags.c_contiguous, row0, size, mtime):
        return None, None
    return arr[1:], at + ROW_BYTES


def open_index(path: str, version: tuple[int, float] | None = None,
               mmap: bool = False) -> tuple[np.ndarray, int | None]:
    """(rows [n, 6] of shard `path`'s index at `version` (size, mtime; stat'ed when None), the
    byte offset of example 0's row in the stored index file, None when it could not be stored):
    the stored index, else the JSON one converted, else a scan of the tar; a built one is stored
    beside the shard. `mmap`: a stored index is opened lazily (see `_stored`)."""
    size, mtime = version or stat(path)
    ip = path + INDEX_SUFFIX
    try:
        rows, at = _stored(path, size, mtime, mmap)
        if rows is not None:
            return rows, at
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EOFError) as e:
        logging.warning("the index %s is unreadable (%s: %s); rebuilding it from the shard",
                        ip, type(e).__name__, str(e))
    if version is not None and stat(path) != (size, mtime):
        raise RuntimeError(f"webdataset shard {path} changed while this job reads it (size, "
                           f"mtime {stat(path)}, listed as {(size, mtime)}); restart the job")
    rows = _from_json(path, size, mtime)
    if rows is None:
        rows = scan_tar(path)
    packed = _pack(rows, size, mtime)
    buf = io.BytesIO()
    np.save(buf, packed)
    try:
        paths.write_bytes(ip, buf.getvalue())
    except OSError as e:   # (str(e): a log record holding e would keep this frame's rows)
        logging.warning("cannot store the index of %s beside it (%s); it is rebuilt at every "
                        "start", path, str(e))
        return rows, None
    return rows, len(buf.getvalue()) - packed.nbytes + ROW_BYTES


def load(path: str, version: tuple[int, float] | None = None, mmap: bool = False) -> np.ndarray:
    """The rows of `open_index`."""
    return open_index(path, version, mmap)[0]


def read_row(path: str, at: int, k: int) -> list[int]:
    """Example k's row of the stored index of shard `path`, whose example 0 is at byte `at`
    (from `open_index`): one small read, nothing of the index kept."""
    ip = path + INDEX_SUFFIX
    data = paths.read_range(ip, at + k * ROW_BYTES, ROW_BYTES)
    if len(data) != ROW_BYTES:
        raise RuntimeError(f"the index {ip} ends before example {k}: it changed while this job "
                           "reads it; restart the job")
    return np.frombuffer(data, "<i8").tolist()


def _read_summary(folder: str) -> dict[str, tuple[int, float, int]]:
    p = os.path.join(folder, SUMMARY_NAME)
    try:
        z = paths.np_load(p)
        return {str(n): (int(s), float(t), int(c)) for n, s, t, c in
                zip(z["name"], z["size"], z["mtime"], z["count"], strict=True)}
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001 - any damage: the counts are taken from the indexes
        logging.warning("the index summary %s is unreadable (%s: %s); rebuilding it", p,
                        type(e).__name__, str(e))
        return {}


def _write_summary(folder: str, entries: dict[str, tuple[int, float, int]]) -> None:
    names = sorted(entries)
    cols = list(zip(*(entries[n] for n in names)))
    try:
        paths.save_npz(os.path.join(folder, SUMMARY_NAME), name=np.array(names, str),
                       size=np.array(cols[0], np.int64), mtime=np.array(cols[1], np.float64),
                       count=np.array(cols[2], np.int64))
    except OSError as e:
        logging.warning("cannot store the index summary in %s (%s); the shard indexes are "
                        "opened at every start", folder, str(e))


def counts(shards: list[str], threads: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(size, mtime, examples) of each shard, from its folder's summary where that is current,
    else from the shard's index (read or built, in parallel: on object storage each is a round
    trip); the summaries are brought up to date."""
    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        versions = list(pool.map(stat, shards))
        folders = collections.defaultdict(list)
        for i, p in enumerate(shards):
            folders[os.path.dirname(p)].append(i)
        summaries = dict(zip(folders, pool.map(_read_summary, folders)))
        count = np.full(len(shards), -1, np.int64)
        for folder, members in folders.items():
            for i in members:
                got = summaries[folder].get(os.path.basename(shards[i]))
                if got is not None and got[:2] == versions[i]:
                    count[i] = got[2]
        todo = np.flatnonzero(count < 0).tolist()
        for i, n in zip(todo, pool.map(lambda i: len(load(shards[i], versions[i], mmap=True)),
                                       todo)):
            count[i] = n
    for folder in {os.path.dirname(shards[i]) for i in todo}:
        entries = summaries[folder]
        entries.update({os.path.basename(shards[i]): (*versions[i], int(count[i]))
                        for i in folders[folder]})
        _write_summary(folder, entries)
    size = np.array([v[0] for v in versions], np.int64)
    mtime = np.array([v[1] for v in versions], np.float64)
    return size, mtime, count


class LRU:
    """At most `capacity` values by key, the least recently used dropped first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"index cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
