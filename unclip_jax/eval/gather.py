"""Gathering per-example results of every process on every process.

Each process evaluates its own slice of the captions; these concatenate the slices process-major
with `multihost_utils.process_allgather`. With one process they return their input."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows (process-major) on all processes; slices may differ in
    length, so rows are padded to the longest and trimmed after the gather."""
    import jax
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    x = np.asarray(x)
    lengths = np.asarray(multihost_utils.process_allgather(np.int64(len(x)))).reshape(-1)
    m = int(lengths.max())
    padded = np.zeros((m,) + x.shape[1:], x.dtype)
    padded[:len(x)] = x
    allx = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
    return np.concatenate([allx[i, :int(k)] for i, k in enumerate(lengths)], 0)


def allgather_strings(strs: list[str]) -> list[str]:
    import jax
    if jax.process_count() == 1:
        return list(strs)
    enc = [s.encode("utf-8") for s in strs]
    width = int(allgather_rows(np.asarray([max([len(e) for e in enc] or [0])], np.int64)).max())
    arr = np.zeros((len(enc), max(width, 1)), np.uint8)
    for i, e in enumerate(enc):
        arr[i, :len(e)] = np.frombuffer(e, np.uint8)
    return [bytes(r).rstrip(b"\0").decode("utf-8") for r in allgather_rows(arr)]


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Counts summed over processes (every process must hold the same keys)."""
    import jax
    if jax.process_count() == 1:
        return dict(counts)
    keys = sorted(counts)
    summed = allgather_rows(np.asarray([[counts[k] for k in keys]], np.int64)).sum(0)
    return {k: int(v) for k, v in zip(keys, summed)}


def merge_shapes(parts: Sequence[dict]) -> dict:
    """eval.shapes_accuracy results of this process's batches merged over every process (a
    process with no batch still takes part)."""
    from unclip_jax.eval import shapes_accuracy as S
    return S.from_flat_counts(sum_counts(S.flat_counts(parts)))
