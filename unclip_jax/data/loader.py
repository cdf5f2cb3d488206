"""The resumable batch iterator every reader shares (grain underneath).

grain does the index work: this process's examples, a fresh permutation per (seed, epoch)
(`MapDataset.shuffle` before `repeat`), and threaded prefetching whose checkpoint is the number of
examples handed out. Decoding happens in grain's threads; a record that cannot be used comes out
as a `_Skip` marker rather than being dropped by grain, so the batching loop here counts it and
moves on. The iterator state is grain's state plus those counters, and is taken between batches,
so a fresh iterator restored from it yields exactly the next batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from unclip_jax.data import preprocess

BASE_FIELDS = ("image", "caption", "index")
SKIP_REASONS = ("corrupt", "no_caption", "missing_file", "no_image")


@dataclasses.dataclass(frozen=True)
class _Skip:
    reason: str


class _Load:
    """source index -> example dict (uint8 image at `resolution`) or a _Skip."""

    def __init__(self, source, resolution: int, fields: Sequence[str]):
        self.source, self.resolution, self.fields = source, resolution, tuple(fields)

    def __call__(self, i) -> dict | _Skip:
        raw = self.source[int(i)]
        if raw.get("missing"):
            return _Skip(raw["missing"])
        if "caption" in self.fields and raw.get("caption") is None:
            return _Skip("no_caption")
        out = {k: raw[k] for k in self.fields if k != "image"}
        if "image" in self.fields:
            if raw.get("image") is None:
                return _Skip("no_image")
            try:
                img = preprocess.decode(raw["image"])
            except preprocess.CorruptImage:
                return _Skip("corrupt")
            out["image"] = preprocess.resize_center_crop(img, self.resolution)
        return out


def _collate(examples: list[dict]) -> dict[str, np.ndarray]:
    batch = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        if k == "image":
            batch[k] = preprocess.normalize(np.stack(vals))
        elif k == "caption":
            batch[k] = np.array(vals, dtype=object)
        elif k == "index":
            batch[k] = np.asarray(vals, np.int64)
        else:
            batch[k] = np.stack([np.asarray(v) for v in vals])
    return batch


def shuffle_seed(seed: int) -> int:
    """A 32-bit grain seed from the experiment seed (grain adds the epoch to it)."""
    return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1)[0])


class BatchIterator:
    """DataIterator (see unclip_jax.stages.base) over a random-access source."""

    def __init__(self, source, *, resolution: int, local_batch_size: int, seed: int,
                 fields: Sequence[str] | None = None, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 num_threads: int = 4, prefetch: int = 64, postprocess=None):
        available = tuple(getattr(source, "base_fields", BASE_FIELDS)) + tuple(source.extra_fields)
        fields = available if fields is None else tuple(fields)
        unknown = [f for f in fields if f not in available]
        if unknown:
            raise ValueError(f"fields {unknown} not provided by {source.path}; "
                             f"available: {list(available)}")
        if local_batch_size < 1:
            raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
        self.source, self.fields = source, fields
        self._batch_size, self._drop_remainder = local_batch_size, drop_remainder
        self._postprocess = postprocess
        ds = grain.MapDataset.range(len(source))
        if shuffle:
            ds = ds.shuffle(seed=shuffle_seed(seed))
        ds = ds.repeat(num_epochs).map(_Load(source, resolution, fields))
        self._ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=prefetch if num_threads else 0))
        self._it = iter(self._ds)
        self._counts = {f"skipped_{r}": 0 for r in SKIP_REASONS}
        self._counts["examples"] = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        examples, skipped_in_a_row = [], 0
        while len(examples) < self._batch_size:
            try:
                ex = next(self._it)
            except StopIteration:
                if examples and not self._drop_remainder:
                    break
                raise
            if isinstance(ex, _Skip):
                self._counts[f"skipped_{ex.reason}"] += 1
                skipped_in_a_row += 1
                # Without this an unreadable dataset would loop forever over infinite epochs.
                if skipped_in_a_row > len(self.source):
                    raise RuntimeError(f"every example of {self.source.path} was skipped: "
                                       f"{self.stats()}")
                continue
            skipped_in_a_row = 0
            examples.append(ex)
        self._counts["examples"] += len(examples)
        batch = _collate(examples)
        return self._postprocess(batch) if self._postprocess else batch

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), "counts": dict(self._counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state["grain"])
        self._counts.update(state["counts"])

    def seek(self, examples: int, process_count: int) -> None:
        """Resume on another process count from the job's position (`examples` consumed by all
        processes): this process's slice and shuffle differ from the writer's, so it starts at
        the same fraction of its own epoch stream (examples // process_count); within the epoch
        in progress some examples may come twice or not at all, later epochs are whole."""
        self._it.set_state({"next_index": int(examples) // int(process_count)})
        self._counts["examples"] = int(examples) // int(process_count)

    def stats(self) -> dict[str, float]:
        out = dict(self._counts)
        out["epoch"] = self._it.get_state()["next_index"] / len(self.source)
        return out
