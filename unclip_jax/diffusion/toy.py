"""Closed-form ideal denoisers for toy data (isotropic Gaussian mixtures), for demos and tests.

For x0 ~ sum_k w_k N(m_k, s_k^2 I) and x_t = a x0 + b eps (a^2 = alpha_bar, b^2 = 1 - a^2), each
component gives x_t | k ~ N(a m_k, (a^2 s_k^2 + b^2) I) and E[x0 | x_t, k] =
m_k + a s_k^2 (x_t - a m_k) / (a^2 s_k^2 + b^2); E[x0 | x_t] weights these by the posterior
responsibilities of the components.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.schedules import Schedule


def sample_gaussian_mixture(rng, n: int, means, stds, weights) -> jax.Array:
    means, stds = jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)
    k_comp, k_noise = jax.random.split(rng)
    comp = jax.random.choice(k_comp, len(weights), (n,), p=jnp.asarray(weights, jnp.float32))
    noise = jax.random.normal(k_noise, (n, means.shape[1]), jnp.float32)
    return means[comp] + stds[comp][:, None] * noise


def gaussian_mixture_denoiser(train_schedule: Schedule, means, stds, weights,
                              parameterization: str = "eps"):
    """model_fn(x [B, D], t [B] training timesteps, cond ignored) -> ideal prediction.

    `train_schedule` must be the schedule the timesteps refer to (the un-respaced one)."""
    means = jnp.asarray(np.asarray(means, np.float32))        # [K, D]
    var = jnp.asarray(np.asarray(stds, np.float32) ** 2)       # [K]
    log_w = jnp.log(jnp.asarray(np.asarray(weights, np.float32)))
    d = means.shape[1]

    def model_fn(x, t, cond=None):
        del cond
        a = train_schedule.sqrt_alphas_cumprod[t][:, None, None]          # [B, 1, 1]
        b2 = (1.0 - train_schedule.alphas_cumprod[t])[:, None, None]
        v_k = a ** 2 * var[None, :, None] + b2                            # [B, K, 1]
        diff = x[:, None, :] - a * means[None]                            # [B, K, D]
        logp = log_w[None] - 0.5 * (jnp.sum(diff ** 2, -1) / v_k[..., 0]
                                    + d * jnp.log(v_k[..., 0]))
        resp = jax.nn.softmax(logp, axis=-1)[..., None]                   # [B, K, 1]
        x0_k = means[None] + a * var[None, :, None] * diff / v_k
        x0 = jnp.sum(resp * x0_k, axis=1)
        if parameterization == "x0":
            return x0
        eps = g.predict_eps_from_x0(train_schedule, x, t, x0)
        if parameterization == "eps":
            return eps
        return g.v_from(train_schedule, x0, eps, t)

    return model_fn
