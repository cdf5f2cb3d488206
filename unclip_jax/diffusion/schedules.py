"""Noise schedules as a pytree of per-timestep constants.

Everything is computed in float64 with numpy and stored as float32 jax arrays, so the sampler and
losses index them with traced timesteps inside jit. `timestep_map[i]` is the training timestep
that index i stands for: the identity for a training schedule, the kept steps after `respace`.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import numpy as np


@flax.struct.dataclass
class Schedule:
    betas: jax.Array
    log_alphas: jax.Array                     # log(1 - beta_t): exact enough to respace from
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array            # alpha_bar_{t-1}, 1 at t = 0
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_variance: jax.Array             # beta_tilde_t of q(x_{t-1} | x_t, x_0)
    posterior_log_variance_clipped: jax.Array  # log beta_tilde with t=0 set to t=1's (IDDPM)
    posterior_mean_coef1: jax.Array           # multiplies x_0
    posterior_mean_coef2: jax.Array           # multiplies x_t
    timestep_map: jax.Array                   # int32: training timestep of each index

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008, betas capped."""
    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    t = num_timesteps
    return np.array([min(1.0 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta)
                     for i in range(t)], np.float64)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's 1e-4..0.02 over 1000 steps, scaled by 1000/T so any T covers the same noise range."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def schedule_from_betas(betas, timestep_map=None) -> Schedule:
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
        raise ValueError("betas must be a 1-D array in (0, 1)")
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # beta_tilde_0 = 0; IDDPM clips its log to beta_tilde_1's so log-variances stay finite.
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else \
        np.log(np.maximum(post_var, 1e-20))
    if timestep_map is None:
        timestep_map = np.arange(len(betas))
    # Built eagerly even when first called inside a jit trace: callers cache schedules, and a
    # staged (traced) array kept in a cache would leak into the next trace.
    # device_put, not jnp.asarray: under a mesh of abstract (AOT, TPU-topology) devices
    # jnp.asarray looks for an executable's local devices and fails.
    f32 = lambda a: jax.device_put(np.asarray(a, np.float32))  # noqa: E731
    with jax.ensure_compile_time_eval():
        return _schedule(f32, betas, ac, ac_prev, post_var, post_logvar, timestep_map)


def _schedule(f32, betas, ac, ac_prev, post_var, post_logvar, timestep_map) -> Schedule:
    return Schedule(
        betas=f32(betas),
        log_alphas=f32(np.log1p(-betas)),
        alphas_cumprod=f32(ac),
        alphas_cumprod_prev=f32(ac_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)),
        timestep_map=jax.device_put(np.asarray(timestep_map, np.int32)),
    )


def make_schedule(name: str, num_timesteps: int = 1000) -> Schedule:
    """`name` is "cosine" (Improved DDPM) or "linear" (DDPM, scaled to `num_timesteps`)."""
    if name == "cosine":
        return schedule_from_betas(cosine_betas(num_timesteps))
    if name == "linear":
        return schedule_from_betas(linear_betas(num_timesteps))
    raise ValueError(f"unknown noise schedule {name!r}; use 'cosine' or 'linear'")
