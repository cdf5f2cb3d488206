"""Random-access sources of raw records, one per data `name`, already split across processes.

A source has `len()`, `source[i] -> raw record` for its local examples, `path` (for messages) and
`extra_fields` (names of the per-example arrays it adds besides image / caption / index).
A raw record is a dict: "index" (int, global example id), "image" (encoded bytes or a uint8 array;
None when absent), "caption" (str or None), "missing" (a reason string, when the record cannot be
read at all), plus the extra fields. Reading never raises for bad data: problems are reported in
the record and counted by the iterator.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any

import ml_collections
import numpy as np

from unclip_jax import paths
from unclip_jax.data import cache, shard_index

# Webdataset example ids: shard number in the sorted shard list, and position inside the shard.
SHARD_BITS = 32


def _split_path(path: str, split: str) -> str:
    return path.replace("{split}", split)


def _as_text(value) -> str | None:
    """A caption from bytes / str / a list of them (first one); None when empty."""
    if isinstance(value, (list, tuple, np.ndarray)):
        value = value[0] if len(value) else None
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", errors="replace")
    if value is None:
        return None
    value = str(value).strip()
    return value or None


# ------------------------------------------------------------------------------------------ tfds
class TfdsSource:
    """Any tfds dataset prepared as array_record, read TF-free through `data_source`."""

    def __init__(self, data_source, *, path: str, image_key: str, caption_key: str,
                 process_index: int, process_count: int):
        self._ds = data_source
        self.path = path
        self._image_key, self._caption_key = image_key, caption_key
        self._pi, self._pc = process_index, process_count
        n = len(data_source)
        if n == 0:
            raise ValueError(f"dataset {path} is empty")
        self._len = len(range(process_index, n, process_count))
        if self._len == 0:
            raise ValueError(f"dataset {path} has {n} examples, fewer than the "
                             f"{process_count} processes reading it")
        self.extra_fields: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self._len

    def global_index(self, i: int) -> int:
        return self._pi + i * self._pc

    def read(self, index: int) -> dict:
        """The raw record of a global example index."""
        rec = self._ds[index]
        return {"index": index, "image": rec.get(self._image_key),
                "caption": _as_text(rec.get(self._caption_key)), "_record": rec}

    def __getitem__(self, i: int) -> dict:
        return self.read(self.global_index(i))


def open_tfds(name: str, split: str, data_dir: str | None, image_key: str, caption_key: str,
              process_index: int, process_count: int) -> TfdsSource:
    """A prepared tfds dataset (`name`: "name", "name/config", "name:version", ...) under
    `data_dir`, local or on object storage (gs://...). tfds reads array_record files with
    local file I/O only, so from object storage each process reads a local copy of the
    prepared folder <data_dir>/<name>/<config>/<version>/ (`paths.local_dir`: downloaded once
    per process and version of its files)."""
    import tensorflow_datasets as tfds

    where = f"tfds dataset {name!r} split {split!r} (data_dir={data_dir!r})"
    paths.check_bucket(data_dir or "")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        info = builder.info
    except Exception as e:  # tfds raises several types for unknown / unprepared datasets
        # tfds appends the list of every known dataset: keep the first line only.
        raise FileNotFoundError(f"cannot open {where}: {str(e).splitlines()[0]}") from e
    if data_dir and paths.is_url(data_dir):
        # A registered builder (its info from code) names a folder even when nothing is
        # prepared there.
        folder = str(builder.data_dir)
        paths.refresh(folder)
        if not paths.path(f"{folder}/dataset_info.json").exists():
            raise FileNotFoundError(f"cannot open {where}: no prepared dataset at {folder}")
        builder = tfds.builder_from_directory(paths.local_dir(folder, recursive=True))
        info = builder.info
    for key in (image_key, caption_key):
        if key not in info.features:
            raise KeyError(f"{where} has no feature {key!r}; features: {list(info.features)}")
    try:
        ds = builder.as_data_source(split, decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:
        raise FileNotFoundError(
            f"cannot read {where} as array_record: {str(e).splitlines()[0]}") from e
    return TfdsSource(ds, path=where, image_key=image_key, caption_key=caption_key,
                      process_index=process_index, process_count=process_count)


# ---------------------------------------------------------------------------------------- shapes
SHAPES_FIELDS = ("background", "num_objects", "obj_shape", "obj_colour", "obj_size",
                 "obj_position", "obj_x", "obj_y")


class ShapesSource(TfdsSource):
    """The built-in shapes dataset: a tfds source plus the scene attributes as arrays."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_fields = SHAPES_FIELDS

    def read(self, index: int) -> dict:
        from unclip_jax.data.shapes_tfds import MAX_OBJECTS

        out = super().read(index)
        rec = out.pop("_record")
        objs = rec["objects"]
        n = int(rec["num_objects"])
        out["background"] = np.int32(rec["background"])
        out["num_objects"] = np.int32(n)
        for key in ("shape", "colour", "size", "position", "x", "y"):
            dtype = np.float32 if key in ("x", "y") else np.int32
            arr = np.full((MAX_OBJECTS,), -1, dtype)  # -1: no such object
            arr[:n] = np.asarray(objs[key], dtype)[:n]
            out[f"obj_{key}"] = arr
        return out


def open_shapes(cfg, split: str, process_index: int, process_count: int) -> ShapesSource:
    import tensorflow_datasets as tfds

    from unclip_jax.data import shapes_tfds

    s = cfg.shapes
    b = shapes_tfds.builder(s.num_train, s.num_test, s.seed, s.image_size,
                            data_dir=cfg.data_dir or None)
    if split not in b.info.splits:
        raise KeyError(f"shapes dataset has no split {split!r}; splits: {list(b.info.splits)}")
    ds = b.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return ShapesSource(ds, path=f"shapes dataset {b.data_dir} split {split!r}",
                        image_key="image", caption_key="caption",
                        process_index=process_index, process_count=process_count)


# ------------------------------------------------------------------------------------ webdataset
# Shard indexes held in memory at once by a source, for shards whose index cannot be stored.
INDEX_CACHE_SHARDS = 64


class WebDatasetSource:
    """img2dataset tar shards (KEY.jpg|png|webp, KEY.txt, optional KEY.json), indexed.

    Shard i of the sorted list goes to process i % process_count. The training stream opens the
    shards as one process and each process then reads only the examples of its rows (see
    unclip_jax.data.loader). Shards may be local or on object storage (`gs://b/shards/*.tar`).
    A missing KEY.txt falls back to the "caption" field of KEY.json.

    Memory is O(number of shards), whatever their examples: per shard its size, mtime, example
    count (`shard_index.counts`: one summary file per folder, read on first use, so that a
    source read only by global index, as join_images does, never counts the shards it is not
    asked about) and where example 0's row lies in its index file. A shard's index is opened
    and checked when one of its examples is first read; later reads take the example's row
    alone (`shard_index.read_row`: one 48-byte read, a ranged request on object storage).
    Holding whole indexes instead, the training stream's global shuffle would miss any bounded
    cache of them at almost every read (each miss reading a whole index, 48 bytes per example
    of its shard, for one example), and
    mapping every index into memory is not possible on object storage and meets the kernel's
    cap on mappings for tens of thousands of local shards. Only an index that cannot be stored
    (a read-only folder) is held, at most `cache_shards` of them (least recently used dropped).
    """

    extra_fields: tuple[str, ...] = ()

    def __init__(self, pattern: str, process_index: int, process_count: int,
                 cache_shards: int = INDEX_CACHE_SHARDS):
        self.path = pattern
        self.shards = list_shards(pattern)
        self._mine = range(process_index, len(self.shards), process_count)
        if not self._mine:
            raise ValueError(f"{len(self.shards)} shards match {pattern!r}, fewer than the "
                             f"{process_count} processes reading them")
        self._process_index = process_index
        # Per shard: its (size, mtime) when counted (-1: not yet), its examples, and the byte
        # offset of example 0's row in its stored index file (-1: not opened yet, or unstored).
        n = len(self.shards)
        self._size, self._mtime = np.full(n, -1, np.int64), np.zeros(n, np.float64)
        self._count, self._row_at = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        self._starts = None   # first local position of each of this process's shards
        self._lock = threading.Lock()
        self._unstored = shard_index.LRU(cache_shards)

    def _open_index(self, s: int) -> np.ndarray:
        known = self._size[s] >= 0
        rows, at = shard_index.open_index(self.shards[s], (int(self._size[s]), float(
            self._mtime[s])) if known else None, mmap=True)
        if known and len(rows) != self._count[s]:
            raise RuntimeError(f"the index of webdataset shard {self.shards[s]} holds "
                               f"{len(rows)} examples, {self._count[s]} when the job started")
        self._count[s] = len(rows)
        if at is None:
            self._unstored.put(s, rows)
        else:
            self._row_at[s] = at
        return rows

    def _entry(self, s: int, k: int) -> list[int]:
        """Example k of shard s: (offset, size) of its image, txt and json (-1: absent)."""
        rows = None
        if self._row_at[s] < 0:
            rows = self._unstored.get(s)
            if rows is None:
                rows = self._open_index(s)
        if not 0 <= k < self._count[s]:
            raise IndexError(f"example {k} of webdataset shard {self.shards[s]}: its index "
                             f"holds {self._count[s]}")
        if rows is not None:
            return rows[k].tolist()
        return shard_index.read_row(self.shards[s], int(self._row_at[s]), k)

    @property
    def _local_starts(self) -> np.ndarray:
        with self._lock:
            if self._starts is None:
                mine = list(self._mine)
                size, mtime, count = shard_index.counts([self.shards[s] for s in mine])
                self._size[mine], self._mtime[mine], self._count[mine] = size, mtime, count
                if not count.sum():
                    raise ValueError(f"webdataset shards {self.path!r} hold no examples for "
                                     f"process {self._process_index}")
                self._starts = np.concatenate([[0], np.cumsum(count)])
            return self._starts

    def __len__(self) -> int:
        return int(self._local_starts[-1])

    def global_index(self, i: int) -> int:
        starts = self._local_starts
        j = int(np.searchsorted(starts, i, side="right")) - 1
        return (self._mine[j] << SHARD_BITS) | (int(i) - int(starts[j]))

    def read(self, index: int) -> dict:
        s, k = index >> SHARD_BITS, index & ((1 << SHARD_BITS) - 1)
        img_at, img_n, txt_at, txt_n, json_at, json_n = self._entry(s, k)
        caption = (txt_at, txt_n) if txt_at >= 0 else (json_at, json_n)
        want = [(at, n) for at, n in ((img_at, img_n), caption) if at >= 0]
        blob, lo = None, 0
        if want:
            lo, hi = min(a for a, _ in want), max(a + n for a, n in want)
            if hi - lo <= sum(n for _, n in want) + 8192:   # adjacent, as a tar holds a key's
                blob = paths.read_range(self.shards[s], lo, hi - lo)   # one read for both

        def member(at, n):
            if blob is not None:
                return blob[at - lo:at - lo + n]
            return paths.read_range(self.shards[s], at, n)
        out = {"index": index, "image": None, "caption": None}
        if img_at >= 0:
            out["image"] = member(img_at, img_n)
        else:
            out["missing"] = "no_image"
        if txt_at >= 0:
            out["caption"] = _as_text(member(txt_at, txt_n))
        elif json_at >= 0:
            try:
                out["caption"] = _as_text(json.loads(member(json_at, json_n)).get("caption"))
            except (ValueError, AttributeError):
                pass
        return out

    def __getitem__(self, i: int) -> dict:
        return self.read(self.global_index(i))


# ---------------------------------------------------------------------------------------- folder
class FolderSource:
    """A folder of images listed in `captions.jsonl` ({"file": ..., "caption": ...} per line;
    {"file", "captions": [...]}, the COCO evaluation layout, gives the first caption).

    Files are relative to the folder. Example i (global) is line i; process p reads lines
    p, p + count, ...; malformed lines are kept and reported as corrupt when read.
    """

    extra_fields: tuple[str, ...] = ()

    def __init__(self, folder: str, process_index: int, process_count: int):
        self.path = folder
        listing = os.path.join(folder, "captions.jsonl")   # the folder may be a gs:// URL
        paths.refresh(listing)
        if not paths.path(listing).is_file():
            raise FileNotFoundError(f"image folder {folder!r} has no captions.jsonl ({listing})")
        self._entries = []
        for line in paths.path(listing).read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise ValueError
            except ValueError:
                entry = {}
            self._entries.append(entry)
        if not self._entries:
            raise ValueError(f"image folder {folder!r}: captions.jsonl lists no images")
        self._pi, self._pc = process_index, process_count
        self._len = len(range(process_index, len(self._entries), process_count))
        if self._len == 0:
            raise ValueError(f"image folder {folder!r} lists {len(self._entries)} images, fewer "
                             f"than the {process_count} processes reading it")

    def __len__(self) -> int:
        return self._len

    def global_index(self, i: int) -> int:
        return self._pi + i * self._pc

    def read(self, index: int) -> dict:
        entry = self._entries[index]
        out = {"index": index, "image": None,
               "caption": _as_text(entry.get("caption", entry.get("captions")))}
        name = entry.get("file")
        if not isinstance(name, str):
            out["missing"] = "corrupt"
            return out
        try:
            out["image"] = paths.path(os.path.join(self.path, name)).read_bytes()
        except OSError:
            out["missing"] = "missing_file"
        return out

    def __getitem__(self, i: int) -> dict:
        return self.read(self.global_index(i))


class CacheSource:
    """Rows of an embedding cache, split across processes (row r goes to process r % count)."""

    base_fields = ("caption", "index")

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        if not cfg.cache_dir:
            raise ValueError("data.cache_dir must be set for data.name='embed_cache'")
        self.path, manifests = cache.load_manifests(cfg.cache_dir, split)
        self.extra_fields = tuple(f for f in cache.EMBED_FIELDS if f in manifests[0]["fields"])
        self._arrays: dict[str, list[np.ndarray]] = {f: [] for f in self.extra_fields + ("index",)}
        self._dtypes = {f: cache.field_dtype(manifests[0], f, self.path) for f in self._arrays}
        want = cfg.get("token_dtype") or "bfloat16"
        got = self._dtypes.get("token_embeddings", want)
        if got != want:
            raise ValueError(f"embedding cache {self.path!r} stores token_embeddings as {got}, "
                             f"config.data.token_dtype is {want}: set --config.data.token_dtype="
                             f"{got} to read it, or re-embed with embed.token_dtype={want}")
        self._captions: list[list[str]] = []
        counts = []
        for m in manifests:
            for s in m["shards"]:
                for f in self._arrays:
                    self._arrays[f].append(cache.load_shard(self.path, f, s["name"],
                                                            self._dtypes[f]))
                self._captions.append(json.loads(paths.path(
                    os.path.join(self.path, f"caption.{s['name']}.json")).read_text()))
                counts.append(s["count"])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self._starts[-1])
        if total == 0:
            raise ValueError(f"embedding cache {self.path!r} holds no examples")
        self._pi, self._pc = process_index, process_count
        self._len = len(range(process_index, total, process_count))
        if self._len == 0:
            raise ValueError(f"embedding cache {self.path!r} has {total} rows, fewer than the "
                             f"{process_count} processes reading it")
        self._join = None
        if cfg.join_images:
            src_cfg = cfg.source or ml_collections.ConfigDict(manifests[0]["source"])
            self._join = open_source(src_cfg, split, 0, 1)
            self.base_fields = ("image",) + self.base_fields

    def __len__(self) -> int:
        return self._len

    def read_row(self, row: int) -> dict[str, Any]:
        shard = int(np.searchsorted(self._starts, row, side="right") - 1)
        k = row - int(self._starts[shard])
        out = {f: cache.decode(np.array(self._arrays[f][shard][k]), self._dtypes[f])
               for f in self.extra_fields}
        out["index"] = int(self._arrays["index"][shard][k])
        out["caption"] = self._captions[shard][k]
        if self._join is not None:
            joined = self._join.read(out["index"])
            out["image"] = joined.get("image")
            if joined.get("missing"):
                out["missing"] = joined["missing"]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.read_row(self._pi + i * self._pc)


def list_shards(pattern: str) -> list[str]:
    """The webdataset shards a comma-separated list of globs matches, sorted (the index files
    beside them left out)."""
    shards = sorted(p for pat in pattern.split(",") for p in paths.glob(pat.strip())
                    if not shard_index.is_index_file(p))
    if not shards:
        raise FileNotFoundError(f"no webdataset shards match {pattern!r}")
    return shards


def index_shards(cfg, split: str, process_index: int, process_count: int) -> None:
    """Before the training stream of a multi-process job opens every shard as one process: each
    process indexes its own share (shards p, p+P, ...) and waits for the others, so that a first
    start scans each shard's tar headers once in all, not once per process (on object storage a
    scan is a ranged read per member). The stream then only reads the stored indexes' headers."""
    if cfg.name != "webdataset" or process_count < 2:
        return
    shards = list_shards(_split_path(cfg.path, split))
    mine = shards[process_index::process_count]
    if mine:
        shard_index.counts(mine)
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"webdataset index {cfg.path} {split}")


def open_source(cfg, split: str, process_index: int, process_count: int):
    """The local source for a data config (see `unclip_jax.data.config`)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    name = cfg.name
    if name == "shapes":
        return open_shapes(cfg, split, process_index, process_count)
    if name == "tfds":
        if not cfg.tfds_name:
            raise ValueError("data.tfds_name must name a tfds dataset for data.name='tfds'")
        return open_tfds(cfg.tfds_name, split, cfg.data_dir or None, cfg.image_key,
                         cfg.caption_key, process_index, process_count)
    if name == "webdataset":
        if not cfg.path:
            raise ValueError("data.path must be a glob of tar shards for data.name='webdataset'")
        return WebDatasetSource(_split_path(cfg.path, split), process_index, process_count)
    if name == "folder":
        if not cfg.path:
            raise ValueError("data.path must be an image folder for data.name='folder'")
        return FolderSource(_split_path(cfg.path, split), process_index, process_count)
    if name == "embed_cache":
        return CacheSource(cfg, split, process_index, process_count)
    raise ValueError(f"unknown data.name {name!r}; expected shapes, tfds, webdataset, folder "
                     f"or embed_cache")
