"""Reverse-process variances: the fixed / learned choices and Analytic-DPM's optimal one."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.schedules import Schedule

VAR_TYPES = ("fixed_small", "fixed_large", "learned_range", "analytic")


def fixed_log_variance(schedule: Schedule, var_type: str) -> jax.Array:
    """Per-index log variance [N]: beta_tilde (clipped) or, for "fixed_large", beta_t with
    beta_tilde_1 at t = 0 (IDDPM), so the first step's variance is not the degenerate beta_0."""
    if var_type == "fixed_small":
        return schedule.posterior_log_variance_clipped
    if var_type == "fixed_large":
        first = schedule.posterior_variance[1:2] if schedule.num_timesteps > 1 else \
            schedule.betas[:1]
        return jnp.log(jnp.concatenate([first, schedule.betas[1:]]))
    raise ValueError(f"not a fixed variance type: {var_type!r}")


def analytic_variance(schedule: Schedule, eps_sq_norm, x0_range: float | None = None):
    """Analytic-DPM (Bao et al. 2022, Thm 1) optimal variance [N] of DDPM's reverse steps.

    eps_sq_norm[n] = E ||eps_theta(x_n, n)||^2 / d over data, at this schedule's indices (use
    `estimate_eps_sq_norm`). With lambda_n^2 = beta_tilde_n (DDPM):
      sigma_n^2 = beta_tilde_n + (sqrt(bbar_n/alpha_n) - sqrt(bbar_{n-1} - beta_tilde_n))^2
                  * (1 - eps_sq_norm[n]),   bbar = 1 - alpha_bar,
    and the squared bracket simplifies to beta_n^2 / (alpha_n bbar_n), which we use to avoid
    float32 cancellation. 1 - eps_sq_norm is clipped to [0, 1] (sigma^2 between beta_tilde_n and
    beta_n / alpha_n). That bracket is huge at the noisiest steps (beta near 1), where
    Monte-Carlo error in eps_sq_norm then becomes large noise: estimate it from enough data, or
    give `x0_range` r (data within [-r, r]) for Thm 2's upper bound
    sigma_n^2 <= beta_tilde_n + posterior_mean_coef1_n^2 r^2 (the bound's bracket simplified).
    """
    betas = schedule.betas
    coef_sq = betas ** 2 / ((1.0 - betas) * (1.0 - schedule.alphas_cumprod))
    gamma = jnp.clip(1.0 - jnp.asarray(eps_sq_norm, jnp.float32), 0.0, 1.0)
    out = schedule.posterior_variance + coef_sq * gamma
    if x0_range is not None:
        out = jnp.minimum(out, schedule.posterior_variance
                          + schedule.posterior_mean_coef1 ** 2 * x0_range ** 2)
    return out


def estimate_eps_sq_norm(model_fn, schedule: Schedule, x0, rng, cond=None, *,
                         parameterization: str = "eps", learned_sigma: bool = False):
    """Monte-Carlo E ||eps_theta(x_n, n)||^2 / d at every index n of `schedule` from one batch of
    data x0 [batch, ...] (average several calls for more data). Loops over n with lax.map, so
    memory is one model call. The model sees training timesteps (schedule.timestep_map)."""
    b = x0.shape[0]

    def one(n):
        noise = jax.random.normal(jax.random.fold_in(rng, n), x0.shape, jnp.float32)
        idx = jnp.full((b,), n, jnp.int32)
        x_t = g.q_sample(schedule, x0, idx, noise)
        out = model_fn(x_t, schedule.timestep_map[idx], cond).astype(jnp.float32)
        pred = g.split_learned_sigma(out)[0] if learned_sigma else out
        _, eps = g.prediction_to_x0_eps(schedule, x_t, idx, pred, parameterization)
        return jnp.mean(eps ** 2)

    return jax.lax.map(one, jnp.arange(schedule.num_timesteps))
