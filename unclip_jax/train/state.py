"""Train state and its sharded creation (eval_shape -> partition specs -> jit with out_shardings)."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimiser steps taken (skipped ones included)
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array           # uint32[2] base key; step keys are fold_in(rng, step), so resume is exact
    bad_steps: jax.Array     # int32: non-finite steps in a row
    skipped_steps: jax.Array  # int32: non-finite steps in total


def _replicated(mesh):
    return NamedSharding(mesh, P())


def abstract_variables(stage, model, config, rng, example_batch, rules):
    """Shapes of the model's variables with their logical-partitioning boxes (nothing allocated)."""
    def init(r):
        with nn.logical_axis_rules(rules):
            return stage.init(model, r, example_batch)
    return jax.eval_shape(init, rng)


def param_shardings(abstract_vars, mesh: Mesh, rules):
    specs = nn.get_partition_spec(abstract_vars)["params"]
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def state_shardings(tx, abstract_params, p_shardings, mesh: Mesh) -> TrainState:
    """Shardings for every leaf of the train state: optimiser moments follow their parameter."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shardings,
                                   transform_non_params=lambda _: _replicated(mesh),
                                   is_leaf=is_sharding)
    rep = _replicated(mesh)
    return TrainState(step=rep, params=p_shardings, ema_params=p_shardings, opt_state=opt_sh,
                      rng=rep, bad_steps=rep, skipped_steps=rep)


def prepare_state(stage, model, tx, config, mesh: Mesh, rules, example_batch):
    """Everything about the train state that needs no memory: returns
    (abstract state with shardings, shardings, init) where `init()` allocates it sharded."""
    seed_rng = jax.random.PRNGKey(int(config.seed))
    init_rng, train_rng = jax.random.split(seed_rng)
    if str(config.train.init_prng) != "threefry2x32":
        init_rng = jax.random.key(int(config.seed), impl=str(config.train.init_prng))
    abstract = abstract_variables(stage, model, config, init_rng, example_batch, rules)
    p_sh = param_shardings(abstract, mesh, rules)
    abstract_params = nn.meta.unbox(abstract)["params"]
    shardings = state_shardings(tx, abstract_params, p_sh, mesh)

    def state_from(params, r_train):
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                          rng=r_train, bad_steps=jnp.zeros((), jnp.int32),
                          skipped_steps=jnp.zeros((), jnp.int32))

    def init_fn(r_init, r_train):
        with nn.logical_axis_rules(rules):
            params = nn.meta.unbox(stage.init(model, r_init, example_batch))["params"]
        return state_from(params, r_train)

    # From the parameter shapes already known: tracing the model's init again costs seconds.
    abstract_st = jax.eval_shape(state_from, abstract_params, train_rng)
    abstract_st = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                               abstract_st, shardings)

    def init():
        with jax.set_mesh(mesh):
            return jax.jit(init_fn, out_shardings=shardings)(init_rng, train_rng)

    return abstract_st, shardings, init


def create_state(stage, model, tx, config, mesh: Mesh, rules, example_batch):
    """Initialise the train state directly into its shardings; returns (state, shardings)."""
    _, shardings, init = prepare_state(stage, model, tx, config, mesh, rules, example_batch)
    return init(), shardings


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
