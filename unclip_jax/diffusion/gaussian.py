"""Forward process, posterior and conversions between eps / x0 / v predictions.

`t` is always an int array of shape [batch] indexing the schedule passed in (for a respaced
schedule that is the respaced index, not the training timestep). Data arrays are [batch, ...].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.schedules import Schedule

PARAMETERIZATIONS = ("eps", "x0", "v")


def extract(arr: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """arr[t] shaped [batch, 1, ..., 1] to broadcast against an ndim-dimensional array."""
    out = arr[t]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def q_sample(schedule: Schedule, x0, t, noise):
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior(schedule: Schedule, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
    n = x_t.ndim
    mean = (extract(schedule.posterior_mean_coef1, t, n) * x0
            + extract(schedule.posterior_mean_coef2, t, n) * x_t)
    return (mean, extract(schedule.posterior_variance, t, n),
            extract(schedule.posterior_log_variance_clipped, t, n))


def _coefs(schedule, t, ndim):
    return (extract(schedule.sqrt_alphas_cumprod, t, ndim),
            extract(schedule.sqrt_one_minus_alphas_cumprod, t, ndim))


def predict_x0_from_eps(schedule: Schedule, x_t, t, eps):
    a, s = _coefs(schedule, t, x_t.ndim)
    return (x_t - s * eps) / a


def predict_eps_from_x0(schedule: Schedule, x_t, t, x0):
    a, s = _coefs(schedule, t, x_t.ndim)
    return (x_t - a * x0) / s


def v_from(schedule: Schedule, x0, eps, t):
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho)."""
    a, s = _coefs(schedule, t, x0.ndim)
    return a * eps - s * x0


def x0_from_v(schedule: Schedule, x_t, t, v):
    a, s = _coefs(schedule, t, x_t.ndim)
    return a * x_t - s * v


def eps_from_v(schedule: Schedule, x_t, t, v):
    a, s = _coefs(schedule, t, x_t.ndim)
    return s * x_t + a * v


def prediction_to_x0_eps(schedule: Schedule, x_t, t, pred, parameterization: str):
    """(x0, eps) implied by a model prediction of the given kind."""
    if parameterization == "eps":
        return predict_x0_from_eps(schedule, x_t, t, pred), pred
    if parameterization == "x0":
        return pred, predict_eps_from_x0(schedule, x_t, t, pred)
    if parameterization == "v":
        return x0_from_v(schedule, x_t, t, pred), eps_from_v(schedule, x_t, t, pred)
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, "
                     f"got {parameterization!r}")


def target_for(schedule: Schedule, x0, t, noise, parameterization: str):
    """What the model is trained to output."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from(schedule, x0, noise, t)
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, "
                     f"got {parameterization!r}")


def split_learned_sigma(output):
    """A learned-sigma model's output [..., 2C] -> (prediction [..., C], v [..., C])."""
    c = output.shape[-1]
    if c % 2:
        raise ValueError(f"a learned-sigma model must output 2*C channels, got {c}")
    return output[..., : c // 2], output[..., c // 2:]


def learned_range_log_variance(schedule: Schedule, t, v):
    """IDDPM: log var = f log beta_t + (1 - f) log beta_tilde_t (clipped), f = (v + 1) / 2."""
    frac = (v + 1.0) / 2.0
    max_log = extract(jnp.log(schedule.betas), t, v.ndim)
    min_log = extract(schedule.posterior_log_variance_clipped, t, v.ndim)
    return frac * max_log + (1.0 - frac) * min_log
