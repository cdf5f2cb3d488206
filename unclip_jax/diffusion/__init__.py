"""Gaussian diffusion core: pure functions over a `Schedule` pytree, shared by every stage.

Schedules and respacing (call outside jit; the result is a pytree of float32 arrays):
  schedule = make_schedule("cosine" | "linear", num_timesteps=1000)
  fast = respace(schedule, "250" | "ddim50" | "karlo25" | "10,10,3,2,2")  # IDDPM spacing
  schedule.timestep_map[n]: training timestep of index n (identity unless respaced)

Training (stages call their model themselves; `t` indexes the training schedule):
  t = sample_timesteps(rng, batch, schedule.num_timesteps)
  x_t = q_sample(schedule, x0, t, noise)
  out = model(x_t, t, cond)            # [..., C], or [..., 2C] = [prediction, v] if sigma learned
  loss, terms = diffusion_loss(schedule, out, x0, x_t, t, noise, parameterization="eps"|"x0"|"v",
                               learned_variance=False, vlb_weight=0.001, min_snr_gamma=0.0)
  # loss [B] (mean over non-batch dims); terms["mse"], terms["vlb"] (bits/dim), terms["loss"].
  # hybrid: loss = mse + vlb_weight * T * L_t, IDDPM's lambda = 0.001; min_snr_gamma > 0
  # weights the mse by min(SNR, gamma) in x0 terms (min_snr_weight, Hang et al. 2023).

Sampling (one lax.scan; jit it with model params closed over or inside `cond`):
  x = sample(model_fn, fast, shape, rng, cond, uncond=None, guidance_scale=1.0,
             method="ddim"|"ddpm", eta=0.0, parameterization="eps",
             var_type="fixed_small"|"fixed_large"|"learned_range"|"analytic",
             learned_sigma=None, clip_x0=None, dynamic_threshold=None, eps_sq_norm=None,
             x0_range=None, x_T=None, trajectory_at=None, callback=None)
  model_fn(x, t, cond) gets t = the TRAINING timestep (int32 [batch]) even when respaced.
  Guidance: uncond + s * (cond - uncond) by batch doubling (one model call per step); with a
  learned sigma only the prediction channels are guided, v comes from the conditional half.
  x_prev, x0 = ddpm_step(schedule, x, n, output, noise, ...)   # one step of the above
  x_T = ddim_invert(model_fn, fast, x0, cond, uncond=None, guidance_scale=1.0,
                    parameterization="eps", learned_sigma=False)

Analytic-DPM (the paper's prior sampler): eps_sq_norm = estimate_eps_sq_norm(model_fn, fast, x0,
rng, cond, parameterization=...) on data batches, then sample(..., method="ddpm",
var_type="analytic", eps_sq_norm=eps_sq_norm, x0_range=None); analytic_variance() gives the
variances. Its noisiest steps amplify Monte-Carlo error in eps_sq_norm: use plenty of data
(batch * dims in the millions) or x0_range (Analytic-DPM's upper bound for bounded data).

Config: `config.diffusion` of a stage starts from `diffusion_config()` (the training schedule);
the U-Net stages add their fields (stages.decoder / stages.upsampler `diffusion_config`).

Conversions: predict_x0_from_eps, predict_eps_from_x0, v_from, x0_from_v, eps_from_v,
prediction_to_x0_eps, q_posterior, learned_range_log_variance. All arrays float32.
"""
import ml_collections

from unclip_jax.diffusion.gaussian import (
    eps_from_v,
    extract,
    learned_range_log_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    prediction_to_x0_eps,
    q_posterior,
    q_sample,
    split_learned_sigma,
    target_for,
    v_from,
    x0_from_v,
)
from unclip_jax.diffusion.guidance import guided_output, threshold_x0
from unclip_jax.diffusion.losses import (
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    mean_flat,
    min_snr_weight,
    normal_kl,
    sample_timesteps,
)
from unclip_jax.diffusion.respace import respace, space_timesteps
from unclip_jax.diffusion.sampler import ddim_invert, ddpm_step, sample
from unclip_jax.diffusion.schedules import (
    Schedule,
    cosine_betas,
    linear_betas,
    make_schedule,
    schedule_from_betas,
)
from unclip_jax.diffusion.variance import (
    analytic_variance,
    estimate_eps_sq_norm,
    fixed_log_variance,
)


def diffusion_config(**kw) -> ml_collections.ConfigDict:
    """`config.diffusion`: the training noise schedule; kw adds or overrides fields."""
    c = ml_collections.ConfigDict(dict(
        schedule="cosine", num_timesteps=1000,
        guidance_scale=3.0))    # classifier-free guidance of unclip_jax.tools.bench_sampling
    c.update(kw)
    return c


__all__ = [
    "Schedule", "analytic_variance", "cosine_betas", "ddim_invert", "ddpm_step", "diffusion_loss",
    "diffusion_config", "discretized_gaussian_log_likelihood", "eps_from_v", "estimate_eps_sq_norm", "extract",
    "fixed_log_variance", "guided_output", "learned_range_log_variance", "linear_betas",
    "make_schedule", "mean_flat", "min_snr_weight", "normal_kl", "predict_eps_from_x0",
    "predict_x0_from_eps",
    "prediction_to_x0_eps", "q_posterior", "q_sample", "respace", "sample", "sample_timesteps",
    "schedule_from_betas", "space_timesteps", "split_learned_sigma", "target_for",
    "threshold_x0", "v_from", "x0_from_v",
]
