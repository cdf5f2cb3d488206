"""The resumable batch iterator every reader shares (grain underneath).

Two kinds of stream:

Training (num_epochs=None: endless, shuffled per (seed, epoch)): one GLOBAL order of examples,
the same for any number of processes. Epoch e is a seeded permutation of every example of the
source (grain's `MapDataset.shuffle`, reseeded per epoch); the epochs follow each other into one
stream, and global batch k is stream positions [k*G, (k+1)*G) (G = the global batch). Process p
of P takes rows [p*B, (p+1)*B) of each global batch (B = G/P) and reads only those examples
(random access by example id). An example that cannot be used (corrupt, no caption, missing
file) is replaced in its row by the next usable example of the same epoch's order (that example
then comes twice in the epoch); the skip is counted once, by the process whose row it was. So
global batch k is the same examples in the same order whatever P, and the iterator's state is
one number, the stream position (examples consumed by all processes).

"No example skipped, none repeated beyond the batches in flight": a checkpoint saved after step
k records position k*G. Resuming it, on any process count, starts at global batch k+1: with the
parameters also rolled back to step k, every example of an epoch's order is trained on exactly
once (substitutes for unusable ones aside). Batches the readers had prefetched but not trained
on when the job stopped (in flight) are simply read again; steps trained after the last
checkpoint are trained again from it, by the restored model.

One pass (num_epochs given: embedding, evaluation): the source is this process's own part (its
shards / every P-th example), in order or shuffled; unusable examples are dropped and the batch
fills from the next ones, the last partial batch is kept unless drop_remainder.

grain does the index work and threaded prefetching; decoding happens in grain's threads; an
unusable record comes out as a `_Skip` marker rather than being dropped by grain, so the
batching loop here counts it. State is taken between batches, so a fresh iterator restored from
it yields exactly the next batch.
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


class _Row:
    """Local position i of process p -> (example, reason its own example was skipped or None).

    Row i is global stream position base + (i // B) * G + p * B + i % B (see the module
    docstring); an unusable example there is replaced by the next usable one of its epoch's
    order."""

    def __init__(self, order, size: int, load: _Load, base: int, global_batch: int,
                 local_batch: int, process_index: int, path: str):
        self.order, self.n, self.load, self.base = order, size, load, base
        self.g, self.b, self.p, self.path = global_batch, local_batch, process_index, path

    def __call__(self, i) -> tuple[dict, str | None]:
        i = int(i)
        q = self.base + (i // self.b) * self.g + self.p * self.b + i % self.b
        epoch_start, j = q - q % self.n, q % self.n
        reason = None
        for t in range(self.n):
            ex = self.load(self.order[epoch_start + (j + t) % self.n])
            if not isinstance(ex, _Skip):
                return ex, reason
            reason = ex.reason if t == 0 else reason
        # Without this an unreadable dataset would loop forever over infinite epochs.
        raise RuntimeError(f"every example of {self.path} was skipped ({self.n} examples; "
                           f"the first as {reason})")


class BatchIterator:
    """DataIterator (see unclip_jax.stages.base) over a random-access source.

    Training stream (num_epochs=None): `source` holds every example and this process takes its
    rows of each global batch of `local_batch_size * process_count`. One pass (num_epochs set):
    `source` is this process's part already (process_index / process_count unused)."""

    def __init__(self, source, *, resolution: int, local_batch_size: int, seed: int,
                 fields: Sequence[str] | None = None, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 num_threads: int = 4, prefetch: int = 64, postprocess=None,
                 process_index: int = 0, process_count: int = 1):
        available = tuple(getattr(source, "base_fields", BASE_FIELDS)) + tuple(source.extra_fields)
        fields = available if fields is None else tuple(fields)
        unknown = [f for f in fields if f not in available]
        if unknown:
            raise ValueError(f"fields {unknown} not provided by {source.path}; "
                             f"available: {list(available)}")
        if local_batch_size < 1:
            raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.source, self.fields = source, fields
        self._batch_size, self._drop_remainder = local_batch_size, drop_remainder
        self._postprocess = postprocess
        self._load = _Load(source, resolution, fields)
        self._read_options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=prefetch if num_threads else 0)
        self._stream = num_epochs is None
        self._counts = {f"skipped_{r}": 0 for r in SKIP_REASONS}
        self._counts["examples"] = 0
        if self._stream:
            self._pi, self._pc = process_index, process_count
            self._global_batch = local_batch_size * process_count
            order = grain.MapDataset.range(len(source))
            if shuffle:
                order = order.shuffle(seed=shuffle_seed(seed))
            self._order = order.repeat(None)
            self._restart(0)
        else:
            ds = grain.MapDataset.range(len(source))
            if shuffle:
                ds = ds.shuffle(seed=shuffle_seed(seed))
            ds = ds.repeat(num_epochs).map(self._load)
            self._it = iter(ds.to_iter_dataset(self._read_options))

    def _restart(self, position: int) -> None:
        """Training stream: the next batch is this process's rows of the global batch starting
        at stream `position`."""
        self._position = int(position)
        row = _Row(self._order, len(self.source), self._load, self._position,
                   self._global_batch, self._batch_size, self._pi, self.source.path)
        # Local positions to the end of the (endless) stream; grain reads them ahead in threads.
        rows = grain.MapDataset.range(2 ** 62).map(row)
        self._it = iter(rows.to_iter_dataset(self._read_options))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stream:
            examples = []
            for _ in range(self._batch_size):
                ex, reason = next(self._it)
                if reason is not None:
                    self._counts[f"skipped_{reason}"] += 1
                examples.append(ex)
            self._position += self._global_batch
        else:
            examples = self._next_in_pass()
        self._counts["examples"] += len(examples)
        batch = _collate(examples)
        return self._postprocess(batch) if self._postprocess else batch

    def _next_in_pass(self) -> list[dict]:
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
                if skipped_in_a_row > len(self.source):
                    raise RuntimeError(f"every example of {self.source.path} was skipped: "
                                       f"{self.stats()}")
                continue
            skipped_in_a_row = 0
            examples.append(ex)
        return examples

    def get_state(self) -> dict[str, Any]:
        if self._stream:
            return {"position": self._position, "counts": dict(self._counts)}
        return {"grain": self._it.get_state(), "counts": dict(self._counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._counts.update(state["counts"])
        if not self._stream:
            self._it.set_state(state["grain"])
        elif "position" in state:
            self._restart(state["position"])
        else:
            # Written before the global order: every process had handed out the same number of
            # local batches, so the job's position is this process's examples times the count.
            self._restart(int(state["counts"]["examples"]) * self._pc)

    def seek(self, examples: int, process_count: int) -> None:
        """Resume the training stream on this iterator's process count from the job's position
        (`examples` consumed by all processes, whatever process count consumed them): exact,
        since the global order does not depend on the count. Skip counters restart at 0."""
        if not self._stream:
            raise ValueError("a one-pass iterator (num_epochs set) cannot seek")
        if int(process_count) != self._pc:
            raise ValueError(f"seek for {process_count} processes on an iterator built for "
                             f"{self._pc}")
        self._counts = {k: 0 for k in self._counts}
        self._counts["examples"] = int(examples) // self._pc
        self._restart(int(examples))

    def stats(self) -> dict[str, float]:
        out = dict(self._counts)
        if self._stream:
            out["epoch"] = self._position / len(self.source)
        else:
            out["epoch"] = self._it.get_state()["next_index"] / len(self.source)
        return out
