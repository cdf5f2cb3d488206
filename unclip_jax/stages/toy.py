"""A tiny stand-in stage: an MLP regressing a fixed random teacher on synthetic data.

It exercises everything the trainer does (sharded params over data/fsdp/tensor, dropout RNG,
resumable deterministic input, non-finite batches) in seconds, so trainer tests don't depend on
the real models. Config: model.{width, hidden, depth, dropout}, data.{dim, poison_steps}.
With data.name set to a file reader (webdataset, folder, embed_cache; see unclip_jax.data.config)
the examples come from that reader's training stream instead: example id -> (x, y), so the
readers' order and resume are exercised by the real trainer.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from unclip_jax.stages.base import Stage


class ToyMLP(nn.Module):
    width: int = 16
    hidden: int = 32
    depth: int = 2
    dropout: float = 0.1
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtype = jnp.dtype(self.dtype)
        init = nn.initializers.lecun_normal()
        x = nn.with_logical_constraint(x.astype(dtype), ("batch", "act_embed"))
        for i in range(self.depth):
            h = nn.Dense(self.hidden, dtype=dtype, name=f"up_{i}",
                         kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
            h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(h))
            x = x + nn.Dense(self.width, dtype=dtype, name=f"down_{i}",
                             kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(h)
        return x.astype(jnp.float32)


class ToyIterator:
    """Example i of the stream is a pure function of (seed, i); a step's global batch is
    examples [step*G, (step+1)*G), of which process p takes its contiguous slice. The position
    (one integer) is the whole state."""

    def __init__(self, seed, dim, global_batch, process_index, local_batch, poison_steps=(),
                 sigterm_at_step=-1):
        self.seed, self.dim = seed, dim
        self.global_batch, self.local_batch = global_batch, local_batch
        self.offset = process_index * local_batch
        self.poison = set(int(s) for s in poison_steps)
        self.step = 0
        self.sigterm_at_step = int(sigterm_at_step)  # test hook: simulate a preemption notice
        self.teacher = _teacher(seed, dim)

    def __iter__(self):
        return self

    def __next__(self):
        start = self.step * self.global_batch + self.offset
        x = np.stack([np.random.default_rng([self.seed, start + j]).standard_normal(self.dim)
                      for j in range(self.local_batch)]).astype(np.float32)
        y = np.sin(x @ self.teacher)
        if self.step in self.poison:
            x[0, 0] = np.nan
        if self.step == self.sigterm_at_step:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGTERM)
        self.step += 1
        return {"x": x, "y": y, "caption": np.array(["toy"] * self.local_batch, dtype=object)}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])

    def seek(self, examples, process_count):
        self.step = int(examples) // self.global_batch  # the stream does not depend on the count

    def stats(self):
        return {"poisoned_batches": float(sum(1 for s in self.poison if s < self.step))}


def _teacher(seed, dim):
    rng = np.random.default_rng([seed, 12345])
    return rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)


class ToyFileData:
    """The toy's examples drawn from a file reader's iterator (ids only, nothing decoded):
    example id i gives x ~ N(0, 1) seeded by (seed, i) and y = sin(x @ teacher). `ids` holds
    the last batch's example ids."""

    def __init__(self, it, seed, dim):
        self.it, self.seed, self.teacher = it, seed, _teacher(seed, dim)
        self.dim, self.ids = dim, None

    def __iter__(self):
        return self

    def __next__(self):
        self.ids = next(self.it)["index"]
        x = np.stack([np.random.default_rng([self.seed, int(i)]).standard_normal(self.dim)
                      for i in self.ids]).astype(np.float32)
        return {"x": x, "y": np.sin(x @ self.teacher)}

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def seek(self, examples, process_count):
        self.it.seek(examples, process_count)

    def stats(self):
        return self.it.stats()


class ToyStage(Stage):
    name = "toy"

    def validate(self, config):
        if int(config.data.dim) != int(config.model.width):
            raise ValueError("config.data.dim must equal config.model.width for the toy stage")

    def build_model(self, config):
        m = config.model
        return ToyMLP(width=int(m.width), hidden=int(m.hidden),
                      depth=int(m.depth), dropout=float(m.dropout),
                      dtype=str(m.dtype))

    def example_batch(self, config, batch_size):
        d = int(config.data.dim)
        return {"x": np.zeros((batch_size, d), np.float32), "y": np.zeros((batch_size, d), np.float32)}

    def init(self, model, rng, batch):
        return model.init({"params": rng}, batch["x"])

    def loss(self, model, params, batch, rng, config):
        pred = model.apply({"params": params}, batch["x"], train=True, rngs={"dropout": rng})
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"mse": loss}

    def make_data(self, config, *, split, process_index, process_count, local_batch_size, seed):
        if config.data.get("name"):
            from unclip_jax.data import make_iterator
            it = make_iterator(config.data, split=split, process_index=process_index,
                               process_count=process_count, local_batch_size=local_batch_size,
                               seed=seed, fields=("index",))
            return ToyFileData(it, seed, int(config.data.dim))
        return ToyIterator(seed, int(config.data.dim), int(config.train.batch_size),
                           process_index, local_batch_size,
                           tuple(config.data.poison_steps),
                           int(config.data.sigterm_at_step))
