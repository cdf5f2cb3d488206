"""Helpers shared by the trainer tests."""
import importlib
import os

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name="toy.py", arg=None):
    """get_config(arg) of experiments/<name> (e.g. "paper/decoder_64.py"), imported as a module."""
    module = "experiments." + name.removesuffix(".py").replace("/", ".").replace(os.sep, ".")
    mod = importlib.import_module(module)
    return mod.get_config(arg) if arg is not None else mod.get_config()


def toy_config(**overrides):
    c = load_config("toy.py")
    c.train.update(num_steps=12, batch_size=16, log_every=2, ckpt_every=4, async_checkpoint=False)
    c.model.dropout = 0.1  # dropout makes RNG handling part of what resume must reproduce
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def host_tree(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_close(a, b, rtol=0.0, atol=0.0):
    la, lb = jax.tree.leaves(host_tree(a)), jax.tree.leaves(host_tree(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def snapshot(root):
    """(relative path, size, mtime) of every file under root: to show nothing was written."""
    out = []
    for r, _, files in os.walk(root):
        for f in files:
            p = os.path.join(r, f)
            out.append((os.path.relpath(p, root), os.path.getsize(p), os.path.getmtime(p)))
    return sorted(out)


def save_untrained(config, workdir, step=1, seed=0):
    """A stage workdir as the trainer leaves it (checkpoint with params, EMA params and config)
    holding freshly initialised weights: a loadable stage without a train-step compile."""
    import flax.linen as nn
    import jax.numpy as jnp

    from unclip_jax.stages import get_stage
    from unclip_jax.train.checkpoint import Checkpointer
    stage = get_stage(config.stage)
    model = stage.build_model(config)
    ex = {k: jnp.asarray(v) for k, v in stage.example_batch(config, 1).items()}
    params = nn.meta.unbox(jax.jit(lambda r: stage.init(model, r, ex))(
        jax.random.key(seed, impl="rbg")))["params"]
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(step, {"params": params, "ema_params": params}, {}, config.to_json_best_effort(),
              examples=0, force=True)
    ckpt.close()
