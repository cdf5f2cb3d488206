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
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from unclip_jax import paths
from unclip_jax.data import cache

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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
    import tensorflow_datasets as tfds

    where = f"tfds dataset {name!r} split {split!r} (data_dir={data_dir!r})"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        info = builder.info
    except Exception as e:  # tfds raises several types for unknown / unprepared datasets
        # tfds appends the list of every known dataset: keep the first line only.
        raise FileNotFoundError(f"cannot open {where}: {str(e).splitlines()[0]}") from e
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
def _index_tar(path: str) -> list[dict]:
    """Examples of one img2dataset tar shard, in tar order: key -> member (offset, size).

    A truncated or damaged shard (an interrupted download) keeps the examples whose members lie
    wholly before the damage, with a warning naming the shard; one that is not a tar at all
    gives none."""
    examples: dict[str, dict] = {}
    file_size = paths.path(path).stat().length
    try:
        with _open_shard(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile() or m.offset_data + m.size > file_size:
                    continue
                base = os.path.basename(m.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(m.name), stem)
                ex = examples.setdefault(key, {"key": key})
                ext = ext.lower()
                if ext in _IMAGE_EXTS and "image" not in ex:
                    ex["image"] = (m.offset_data, m.size)
                elif ext in ("txt", "json"):
                    ex[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        logging.warning("webdataset shard %s is damaged (%s: %s); using the %d examples before "
                        "the damage", path, type(e).__name__, e, len(examples))
    return list(examples.values())


def _open_shard(path: str):
    return open(path, "rb") if not paths.is_url(path) else paths.path(path).open("rb")


INDEX_SUFFIX = ".index.json"


def shard_index(path: str) -> list[dict]:
    """`_index_tar(path)`, built once and stored beside the shard (SHARD.tar.index.json, valid
    while the shard keeps its size and modification time); later starts read that file instead
    of the tar headers. A read-only dataset folder is indexed in memory at each start, with a
    warning."""
    index_path = paths.path(path + INDEX_SUFFIX)
    st = paths.path(path).stat()
    size, mtime = int(st.length), float(st.mtime)
    try:
        stored = json.loads(index_path.read_text())
        if stored.get("size") == size and stored.get("mtime") == mtime:
            return [{k: (tuple(v) if isinstance(v, list) else v) for k, v in ex.items()}
                    for ex in stored["examples"]]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # absent, stale or unreadable: rebuilt below
    examples = _index_tar(path)
    try:
        paths.write_text(index_path, json.dumps({"size": size, "mtime": mtime,
                                                 "examples": examples}))
    except OSError as e:
        logging.warning("cannot store the index of %s beside it (%s); it is rebuilt at every "
                        "start", path, e)
    return examples


class WebDatasetSource:
    """img2dataset tar shards (KEY.jpg|png|webp, KEY.txt, optional KEY.json), indexed.

    Shard i of the sorted list goes to process i % process_count; a process reads the stored
    index (`shard_index`) of its own shards only, and of another shard only when asked for one
    of its examples by global index (`read`). The training stream opens the shards as one
    process (every stored index, read once per start) and each process then reads only the
    examples of its rows (see unclip_jax.data.loader). Shards may be local or on object storage
    (`gs://bucket/shards/*.tar`). A missing KEY.txt falls back to the "caption" field of KEY.json.
    """

    extra_fields: tuple[str, ...] = ()

    def __init__(self, pattern: str, process_index: int, process_count: int):
        self.path = pattern
        self.shards = sorted(p for pat in pattern.split(",") for p in paths.glob(pat.strip())
                             if not p.endswith(INDEX_SUFFIX))
        if not self.shards:
            raise FileNotFoundError(f"no webdataset shards match {pattern!r}")
        self._mine = list(range(process_index, len(self.shards), process_count))
        if not self._mine:
            raise ValueError(f"{len(self.shards)} shards match {pattern!r}, fewer than the "
                             f"{process_count} processes reading them")
        self._process_index = process_index
        self._index: dict[int, list[dict]] = {}
        self._lock = threading.Lock()
        self._local_list = None

    def _shard_index(self, s: int) -> list[dict]:
        with self._lock:
            if s not in self._index:
                self._index[s] = shard_index(self.shards[s])
            return self._index[s]

    @property
    def _local(self) -> list[tuple[int, int]]:
        # Built on first use: a source read only by global index (join_images) never indexes
        # the shards it is not asked about.
        if self._local_list is None:
            # The stored indexes (one small file per shard) read in parallel: on object storage
            # each read is a round trip.
            todo = [s for s in self._mine if s not in self._index]
            with ThreadPoolExecutor(max(1, min(16, len(todo)))) as pool:
                for s, idx in zip(todo, pool.map(shard_index, [self.shards[s] for s in todo])):
                    self._index.setdefault(s, idx)
            local = [(s, k) for s in self._mine for k in range(len(self._shard_index(s)))]
            if not local:
                raise ValueError(f"webdataset shards {self.path!r} hold no examples for process "
                                 f"{self._process_index}")
            self._local_list = local
        return self._local_list

    def __len__(self) -> int:
        return len(self._local)

    def global_index(self, i: int) -> int:
        s, k = self._local[i]
        return (s << SHARD_BITS) | k

    def read(self, index: int) -> dict:
        s, k = index >> SHARD_BITS, index & ((1 << SHARD_BITS) - 1)
        ex = self._shard_index(s)[k]
        out = {"index": index, "image": None, "caption": None}
        with _open_shard(self.shards[s]) as f:
            def member(name):
                f.seek(ex[name][0])
                return f.read(ex[name][1])
            if "image" in ex:
                out["image"] = member("image")
            else:
                out["missing"] = "no_image"
            if "txt" in ex:
                out["caption"] = _as_text(member("txt"))
            elif "json" in ex:
                try:
                    out["caption"] = _as_text(json.loads(member("json")).get("caption"))
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
