"""The contract between the generic trainer (`unclip_jax.train`) and a training stage.

A stage (CLIP, diffusion prior, AR prior, decoder, upsampler, or the toy stand-in) says how to
build its Flax module, what a batch looks like, how to initialise parameters and what the loss is.
The trainer owns everything else: mesh, sharding, optimiser, EMA, checkpoints, logging, resume.

Batches are dicts of numpy arrays. `make_data` yields this process's *local* slice of each global
batch (global_batch_size // process_count examples); the trainer assembles global arrays.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import flax.linen as nn
import jax
import numpy as np


class DataIterator(Protocol):
    """A resumable iterator of local batches.

    `get_state()` returns a JSON-serialisable value; `set_state(s)` on a fresh iterator built
    with the same config makes it yield exactly what the original would have yielded next.
    `stats()` returns counters (e.g. skipped corrupt examples) that the trainer logs.
    """

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...
    def stats(self) -> dict[str, float]: ...


class Stage:
    """Base class; subclasses override the methods below."""

    name: str = "base"

    def validate(self, config) -> None:
        """Raise ValueError naming the bad field; called before anything compiles."""

    def build_model(self, config) -> nn.Module:
        raise NotImplementedError

    def example_batch(self, config, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes (values irrelevant), used for init and AOT."""
        raise NotImplementedError

    def init(self, model: nn.Module, rng: jax.Array, batch: dict[str, jax.Array]):
        """Return the model's variables ({'params': ...}); may carry logical partitioning boxes."""
        raise NotImplementedError

    def loss(self, model: nn.Module, params, batch: dict[str, jax.Array], rng: jax.Array,
             config) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training loss (scalar, float32) and metrics (scalars) for one global batch."""
        raise NotImplementedError

    def make_data(self, config, *, split: str, process_index: int, process_count: int,
                  local_batch_size: int, seed: int) -> DataIterator:
        raise NotImplementedError

    def after_training(self, config, workdir: str, bundle, state, step: int) -> None:
        """Derive what sampling needs from the final weights (`bundle`: the trainer's
        StepBundle, `state` its TrainState at `step` = num_steps), on every process. Called
        whenever a run ends finished, also by a rerun with nothing left to train, so it must skip
        work already done."""
