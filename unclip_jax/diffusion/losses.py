"""Training losses: MSE on the eps / x0 / v target, plus IDDPM's hybrid VLB for learned sigma."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.schedules import Schedule


def sample_timesteps(rng, batch: int, num_timesteps: int) -> jax.Array:
    """Uniform training timesteps, int32 [batch]."""
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)


def mean_flat(x):
    """Mean over all non-batch axes -> [batch]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales, num_bins: int = 256):
    """log P(x) of data in [-1, 1] quantised to `num_bins` levels under N(means, exp(log_scales)^2);
    the end bins take the tails (IDDPM's decoder). Uses the exact normal CDF, and differences it on
    the side of the mean where it is not close to 1, so narrow bins keep float32 precision."""
    half_bin = 1.0 / (num_bins - 1)
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    upper = inv_std * (centered + half_bin)
    lower = inv_std * (centered - half_bin)
    delta = jnp.where(centered > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_cdf_upper = jnp.log(jnp.maximum(ndtr(upper), 1e-12))
    log_sf_lower = jnp.log(jnp.maximum(ndtr(-lower), 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper,
                     jnp.where(x > 0.999, log_sf_lower, jnp.log(jnp.maximum(delta, 1e-12))))


def vlb_terms(schedule: Schedule, x0, x_t, t, pred, log_variance, parameterization: str):
    """Per-example L_t in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, the
    discretised-Gaussian decoder NLL of x0 at t = 0."""
    x0_hat, _ = g.prediction_to_x0_eps(schedule, x_t, t, pred, parameterization)
    model_mean, _, _ = g.q_posterior(schedule, x0_hat, x_t, t)
    true_mean, _, true_logvar = g.q_posterior(schedule, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, log_variance)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(
        x0, model_mean, 0.5 * log_variance)) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def min_snr_weight(schedule: Schedule, t, parameterization: str, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weights [batch] (Hang et al. 2023) for a `parameterization` MSE.

    Every parameterization's MSE is a multiple of the x0 MSE: eps by SNR, v by SNR + 1, x0 by
    1. Min-SNR weights the x0 MSE by min(SNR, gamma), so the per-example factor is that over the
    multiple: low-noise steps (large SNR), which only refine detail, stop dominating the loss."""
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1.0 - abar)
    target = jnp.minimum(snr, gamma)
    if parameterization == "eps":
        return target / snr
    if parameterization == "v":
        return target / (snr + 1.0)
    if parameterization == "x0":
        return target
    raise ValueError(f"min_snr_weight: unknown parameterization {parameterization!r}")


def diffusion_loss(schedule: Schedule, model_output, x0, x_t, t, noise, *,
                   parameterization: str = "eps", learned_variance: bool = False,
                   vlb_weight: float = 0.001, min_snr_gamma: float = 0.0):
    """Per-example loss [batch] and a dict of per-example terms.

    `t` indexes `schedule` (the training schedule). With `learned_variance` the model output has
    2*C channels [prediction, v] and the loss is IDDPM's hybrid: mse + vlb_weight * T * L_t, where
    T * L_t (L_t = terms["vlb"], bits/dim) is the one-sample estimate of the full VLB sum over t,
    so vlb_weight = 0.001 is IDDPM's lambda (loss = mse + L_t at T = 1000). The VLB sees the
    prediction through a stop-gradient: it trains only the variance channels.
    `min_snr_gamma` > 0 weights the MSE by `min_snr_weight` (the VLB term is left as it is).
    """
    model_output = model_output.astype(jnp.float32)
    if learned_variance:
        pred, v = g.split_learned_sigma(model_output)
    else:
        pred = model_output
    target = g.target_for(schedule, x0, t, noise, parameterization)
    mse = mean_flat((target - pred) ** 2)
    terms = {"mse": mse}
    loss = mse
    if min_snr_gamma > 0:
        loss = mse * min_snr_weight(schedule, t, parameterization, min_snr_gamma)
    if learned_variance:
        log_var = g.learned_range_log_variance(schedule, t, v)
        vlb = vlb_terms(schedule, x0, x_t, t, jax.lax.stop_gradient(pred), log_var,
                        parameterization)
        terms["vlb"] = vlb
        loss = loss + vlb_weight * schedule.num_timesteps * vlb
    terms["loss"] = loss
    return loss, terms
