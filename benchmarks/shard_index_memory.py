"""Resident memory of a webdataset source over a large synthetic shard index (a one-off, not a test).

  python -m benchmarks.shard_index_memory write --dir=/tmp/wds --shards=1000 --per_shard=1000
  python -m benchmarks.shard_index_memory read --dir=/tmp/wds [--reads=20000]
  python -m benchmarks.shard_index_memory read --dir=/tmp/wds --sources=/tmp/old_sources.py

`write` makes SHARDS small stand-in shard files and their indexes directly (no images): the
current SHARD.tar.index.npy and the earlier SHARD.tar.index.json, both valid for the file, with
PER_SHARD examples each. `read` (run once per process) opens them as the training stream does
(WebDatasetSource(pattern, 0, 1): every shard), takes len(), then reads READS random examples by
global position (index entry + the member bytes), and prints the peak resident memory (ru_maxrss)
after the imports, after the start and after the reads. `--sources` loads another version of
unclip_jax/data/sources.py (e.g. `git show a1c7bb8:unclip_jax/data/sources.py`, the JSON index)
to compare; `--cache_shards` sets the current source's bound.
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import time

import numpy as np
from absl import app, flags

_DIR = flags.DEFINE_string("dir", "/tmp/wds_index_bench", "Folder of the stand-in shards.")
_SHARDS = flags.DEFINE_integer("shards", 1000, "write: shards.")
_PER = flags.DEFINE_integer("per_shard", 1000, "write: examples per shard.")
_READS = flags.DEFINE_integer("reads", 20000, "read: random examples read.")
_SOURCES = flags.DEFINE_string("sources", None, "read: a sources.py to load instead.")
_CACHE = flags.DEFINE_integer("cache_shards", 0, "read: the current source's cache bound "
                              "(0: its default).")

_MEMBER = 64   # bytes per stand-in member


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(folder: str, shards: int, per: int) -> None:
    from unclip_jax.data import shard_index
    os.makedirs(folder, exist_ok=True)
    # Example k: image, txt and json members of _MEMBER bytes each, one after the other.
    k = np.arange(per, dtype=np.int64)[:, None]
    at = 512 + 3 * _MEMBER * k + np.array([[0, _MEMBER, 2 * _MEMBER]])
    rows = np.stack([at, np.full_like(at, _MEMBER)], -1).reshape(per, 6)
    data = os.urandom(512 + 3 * _MEMBER * per)
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with open(path, "wb") as f:
            f.write(data)
        size, mtime = shard_index.stat(path)
        np.save(path + shard_index.INDEX_SUFFIX, shard_index._pack(rows, size, mtime))
        ex = [{"key": f"{s:05d}{i:05d}", "image": r[:2], "txt": r[2:4], "json": r[4:]}
              for i, r in enumerate(rows.tolist())]
        with open(path + shard_index.JSON_SUFFIX, "w") as f:
            json.dump({"size": size, "mtime": mtime, "examples": ex}, f)
    print(f"wrote {shards} stand-in shards x {per} examples and their indexes in {folder}")


def read(folder: str, reads: int) -> None:
    if _SOURCES.value:
        spec = importlib.util.spec_from_file_location("bench_sources", _SOURCES.value)
        sources = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sources)
        kw = {}
    else:
        from unclip_jax.data import sources
        kw = {"cache_shards": _CACHE.value} if _CACHE.value else {}
    base = _rss_mib()
    t = time.perf_counter()
    src = sources.WebDatasetSource(os.path.join(folder, "*.tar"), 0, 1, **kw)
    n = len(src)
    started, t_start = _rss_mib(), time.perf_counter() - t
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    got = 0
    for i in rng.integers(0, n, reads):
        got += len(src.read(src.global_index(int(i)))["image"])
    t_read = time.perf_counter() - t
    assert got == reads * _MEMBER
    print(json.dumps({"sources": _SOURCES.value or "current", "examples": n,
                      "peak_rss_mib": {"imports": round(base), "started": round(started),
                                       "after_reads": round(_rss_mib())},
                      "start_s": round(t_start, 2), "reads_per_s": round(reads / t_read)}))


def main(argv):
    if len(argv) != 2 or argv[1] not in ("write", "read"):
        raise app.UsageError("usage: shard_index_memory write|read [flags]")
    if argv[1] == "write":
        write(_DIR.value, _SHARDS.value, _PER.value)
    else:
        read(_DIR.value, _READS.value)


if __name__ == "__main__":
    app.run(main)
