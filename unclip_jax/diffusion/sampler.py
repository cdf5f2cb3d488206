"""DDPM / DDIM sampling and DDIM inversion, each one `lax.scan` over the (respaced) steps.

Per-step observation, off the hot path: `trajectory_at` returns the x0 predictions at chosen
indices (written into a preallocated buffer, so no per-step output is stacked), and `callback`
is called on the host through `jax.debug.callback` (only when given).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion import variance as var
from unclip_jax.diffusion.guidance import guided_output, threshold_x0
from unclip_jax.diffusion.schedules import Schedule


def _denoise(model_fn, schedule, x, n, cond, uncond, guidance_scale, parameterization,
             learned_sigma):
    """(x0, eps, v or None) at schedule index n (a scalar); the model sees timestep_map[n]."""
    idx = jnp.full((x.shape[0],), n, jnp.int32)
    out = guided_output(model_fn, x, schedule.timestep_map[idx], cond, uncond, guidance_scale,
                        learned_sigma)
    v = None
    if learned_sigma:
        out, v = g.split_learned_sigma(out)
    x0, eps = g.prediction_to_x0_eps(schedule, x, idx, out, parameterization)
    return x0, eps, v, idx


def _ancestral(schedule, x0, x, idx, logvar, noise):
    mean, _, _ = g.q_posterior(schedule, x0, x, idx)
    return mean + jnp.exp(0.5 * logvar) * noise


def ddpm_step(schedule: Schedule, x, n, output, noise, *, parameterization: str = "eps",
              var_type: str = "fixed_small", clip_x0: float | None = None):
    """One ancestral step of `sample(method="ddpm")` from schedule index n (an int) given the
    model's (guided) output: returns (x at index n-1, x0 prediction). No noise at n = 0.
    For Karlo's UnCLIPScheduler: fixed_small_log is "fixed_small", learned_range is
    "learned_range" (output [..., 2C]), clip_sample_range is `clip_x0`."""
    if var_type not in ("fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"ddpm_step: var_type {var_type!r} is not fixed_small, fixed_large or "
                         "learned_range")
    idx = jnp.full((x.shape[0],), n, jnp.int32)
    v = None
    if var_type == "learned_range":
        output, v = g.split_learned_sigma(output)
    x0, _ = g.prediction_to_x0_eps(schedule, x, idx, output, parameterization)
    x0 = threshold_x0(x0, clip_x0)
    logvar = (g.learned_range_log_variance(schedule, idx, v) if v is not None
              else var.fixed_log_variance(schedule, var_type)[n])
    return _ancestral(schedule, x0, x, idx, logvar, float(n > 0) * noise), x0


def sample(model_fn: Callable, schedule: Schedule, shape: Sequence[int], rng, cond=None, *,
           uncond=None, guidance_scale=1.0, method: str = "ddim", eta=0.0,
           parameterization: str = "eps", var_type: str = "fixed_small",
           learned_sigma: bool | None = None, clip_x0: float | None = None,
           dynamic_threshold: float | None = None, eps_sq_norm=None,
           x0_range: float | None = None, x_T=None,
           trajectory_at: Sequence[int] | None = None, callback: Callable | None = None):
    """Draw samples of `shape` = [batch, ...] with `model_fn(x, t, cond) -> prediction`.

    method "ddpm": ancestral sampling with var_type "fixed_small" (beta_tilde), "fixed_large"
      (beta), "learned_range" (model outputs [prediction, v] on the last axis) or "analytic"
      (Analytic-DPM; pass `eps_sq_norm` and optionally `x0_range`, see variance.py).
    method "ddim": DDIM with `eta` (0 deterministic, 1 matches DDPM fixed_small); a learned-sigma
      model's variance channels are ignored (pass learned_sigma=True).
    `uncond` (same structure as `cond`) turns on classifier-free guidance at `guidance_scale`.
    `clip_x0` / `dynamic_threshold` constrain the x0 prediction each step (see threshold_x0);
    eps is then recomputed from the clipped x0, as IDDPM does.
    `x_T` overrides the initial noise (e.g. from ddim_invert); `rng` may then be None for DDIM
    with eta = 0. `trajectory_at`: schedule indices (N-1 = first step, 0 = last) whose x0
    predictions are also returned, as (samples, x0s [len, *shape]). `callback(n, x_n, x0)`
    runs on the host each step via jax.debug.callback.
    Everything except the arrays (method, var_type, ...) is static; jit with them closed over.
    """
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"method must be 'ddim' or 'ddpm', got {method!r}")
    if var_type not in var.VAR_TYPES:
        raise ValueError(f"var_type must be one of {var.VAR_TYPES}, got {var_type!r}")
    learned_sigma = bool(learned_sigma) or (method == "ddpm" and var_type == "learned_range")
    n_steps = schedule.num_timesteps
    shape = tuple(shape)
    deterministic = method == "ddim" and isinstance(eta, (int, float)) and eta == 0
    if rng is None and not (deterministic and x_T is not None):
        raise ValueError("rng is needed unless x_T is given and the sampler is DDIM with eta=0")
    if rng is not None:
        rng_init, rng_steps = jax.random.split(rng)
    x = jax.random.normal(rng_init, shape, jnp.float32) if x_T is None \
        else jnp.asarray(x_T, jnp.float32)
    if x.shape != shape:
        raise ValueError(f"x_T has shape {x.shape}, expected {shape}")

    if method == "ddpm" and var_type == "analytic":
        if eps_sq_norm is None:
            raise ValueError("var_type='analytic' needs eps_sq_norm (one value per step)")
        step_logvar = jnp.log(var.analytic_variance(schedule, eps_sq_norm, x0_range))
    elif method == "ddpm" and var_type in ("fixed_small", "fixed_large"):
        step_logvar = var.fixed_log_variance(schedule, var_type)
    else:
        step_logvar = None

    slots = np.full(n_steps, -1, np.int32)  # schedule index -> trajectory slot
    if trajectory_at is not None:
        for k, n in enumerate(trajectory_at):
            if not 0 <= n < n_steps:
                raise ValueError(f"trajectory_at index {n} outside [0, {n_steps})")
            slots[n] = k
        traj = jnp.zeros((len(trajectory_at),) + shape, jnp.float32)
    else:
        traj = jnp.zeros((0,), jnp.float32)
    slots = jnp.asarray(slots)

    def step(carry, n):
        x, traj = carry
        x0, eps, v, idx = _denoise(model_fn, schedule, x, n, cond, uncond, guidance_scale,
                                   parameterization, learned_sigma)
        if clip_x0 is not None or dynamic_threshold is not None:
            x0 = threshold_x0(x0, clip_x0, dynamic_threshold)
            eps = g.predict_eps_from_x0(schedule, x, idx, x0)
        if callback is not None:
            jax.debug.callback(callback, n, x, x0)
        if trajectory_at is not None:
            slot = slots[n]
            traj = jax.lax.cond(slot >= 0, lambda tr: tr.at[slot].set(x0), lambda tr: tr, traj)
        noise = (jnp.zeros_like(x) if deterministic else
                 jax.random.normal(jax.random.fold_in(rng_steps, n), shape, jnp.float32))
        not_last = (n > 0).astype(jnp.float32)  # no noise on the final step (IDDPM)
        if method == "ddpm":
            logvar = (g.learned_range_log_variance(schedule, idx, v) if step_logvar is None
                      else step_logvar[n])
            x = _ancestral(schedule, x0, x, idx, logvar, not_last * noise)
        else:
            ab, ab_prev = schedule.alphas_cumprod[n], schedule.alphas_cumprod_prev[n]
            sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
            x = (jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps
                 + not_last * sigma * noise)
        return (x, traj), None

    (x, traj), _ = jax.lax.scan(step, (x, traj), jnp.arange(n_steps - 1, -1, -1))
    return x if trajectory_at is None else (x, traj)


def ddim_invert(model_fn: Callable, schedule: Schedule, x0, cond=None, *, uncond=None,
                guidance_scale=1.0, parameterization: str = "eps", learned_sigma: bool = False,
                callback: Callable | None = None):
    """Deterministic DDIM (eta = 0) inversion: data x0 -> x_T at the schedule's last index.

    Mirrors `sample(method="ddim", eta=0)` step for step: sampling goes from index n to n-1 with
    the model at (x_n, n); inversion goes from n-1 to n with the model at (x_{n-1}, n-1), and its
    first step (clean data -> index 0) uses the model at index 0 on the data. Feeding the result
    to `sample(..., x_T=...)` with the same schedule and conditioning reconstructs x0 up to this
    one-step lag, which vanishes as the steps get finer.
    """
    x = jnp.asarray(x0, jnp.float32)

    def step(x, n):
        m = jnp.maximum(n - 1, 0)
        _, eps, _, _ = _denoise(model_fn, schedule, x, m, cond, uncond, guidance_scale,
                                parameterization, learned_sigma)
        if callback is not None:
            jax.debug.callback(callback, n, x, eps)
        ab_cur = jnp.where(n == 0, 1.0, schedule.alphas_cumprod[m])
        x0_hat = (x - jnp.sqrt(1 - ab_cur) * eps) / jnp.sqrt(ab_cur)
        ab = schedule.alphas_cumprod[n]
        return jnp.sqrt(ab) * x0_hat + jnp.sqrt(1 - ab) * eps, None

    x, _ = jax.lax.scan(step, x, jnp.arange(schedule.num_timesteps))
    return x
