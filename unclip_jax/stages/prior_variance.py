"""The diffusion prior's Analytic-DPM variance (Bao et al. 2022): its statistic, estimated from
the trained prior, stored in the prior's workdir, and read back by the sampler.

The statistic is E ||eps_theta(x_t, t)||^2 / d over training data at every training timestep t
(the paper samples its prior with these variances). It depends only on t, so one file serves
every respacing (`SampleSettings.prior_steps`): the sampler takes its kept timesteps' values.
The same examples give the scaled data's variance per dimension, x0_var: E Var(x0 | x_t) <=
Var(x0) bounds the optimal variance (Analytic-DPM Thm 2 with the spread for the range), which
keeps Monte-Carlo error out of the noisiest step, where the variance formula multiplies it by
~1e5 (cosine schedule).

When: at the end of training (`DiffusionPriorStage.after_training`) when the prior's config has
`diffusion.var_type = "analytic"`, from the EMA weights of the final checkpoint and
`diffusion.analytic_examples` training examples (whole global batches). Re-running the training
command on a finished workdir only checks it (adding `--config.diffusion.var_type=analytic` does
it for a prior trained without); an interrupted estimate resumes from its last batch, and a
prior trained further is re-estimated. File `<prior workdir>/analytic_variance.json`:
  {"eps_sq_norm": [T floats], "x0_var", "num_examples", "step" (checkpoint), "ema": true,
   "schedule", "num_timesteps", "complete", and the running "sums" and "batches" to resume from}
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np

from unclip_jax import paths

STAT_FILE = "analytic_variance.json"
VAR_TYPES = ("fixed_small", "fixed_large", "analytic")
DEFAULT_EXAMPLES = 4096


def stat_path(workdir: str) -> str:
    return os.path.join(workdir, STAT_FILE)


def configured_var_type(config) -> str:
    """The prior config's `diffusion.var_type` (fixed_small when absent)."""
    v = str(config.diffusion.get("var_type", "fixed_small"))
    if v not in VAR_TYPES:
        raise ValueError(f"config.diffusion.var_type {v!r} of the diffusion prior must be one "
                         f"of {VAR_TYPES}")
    return v


def _read(path: str) -> dict | None:
    if not paths.path(path).exists():
        return None
    try:
        return json.loads(paths.path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable Analytic-DPM statistic ({e}); delete it "
                         "and re-run the prior's training command to re-estimate it") from None


def estimate(config, workdir: str, bundle, params, step: int, *, schedule, scaling) -> dict:
    """Estimate and store the statistic for the checkpoint at `step` (every process runs the
    sharded model calls; process 0 writes); `schedule`/`scaling` are the prior's, from
    stages.diffusion_prior (passed in: that module calls this one). Returns the record; a complete one for this step
    with enough examples is returned as is."""
    import jax

    from unclip_jax.models.prior import prior_eps_sq_norm
    from unclip_jax.train.trainer import _global_batch, _numeric

    path = stat_path(workdir)
    gb = int(config.train.batch_size)
    want = int(config.diffusion.get("analytic_examples", DEFAULT_EXAMPLES))
    n_batches = max(1, -(-want // gb))
    rec = _read(path)
    if rec is not None and rec.get("step") == step and rec.get("ema") is True:
        if rec.get("complete") and rec["num_examples"] >= n_batches * gb:
            return rec
    else:   # none yet, or made from other weights (a prior trained further): start afresh
        rec = None
    data = bundle.stage.make_data(config, split="train", process_index=jax.process_index(),
                                  process_count=jax.process_count(), local_batch_size=gb //
                                  jax.process_count(), seed=int(config.seed) + 1)
    sums, done = None, 0   # [sum of eps_sq_norm * batch (T), sum x0 (D), sum x0^2 (D)]
    if rec is not None:    # resume an interrupted estimate, or add examples to a finished one
        sums, done = [np.asarray(v, np.float64) for v in rec["sums"]], int(rec["batches"])
    for _ in range(done):   # the batches already counted (each process skips its own share)
        next(data)
    with jax.set_mesh(bundle.mesh):
        fn = jax.jit(lambda p, b, r: prior_eps_sq_norm(bundle.model, p, b, r, schedule=schedule,
                                                       scaling=scaling))
        base = jax.random.PRNGKey(int(config.seed) + 2)
        while done < n_batches:
            batch = _global_batch(_numeric(next(data)), bundle.batch_sharding)
            # fold_in by batch index: an interrupted estimate resumes to the same numbers
            eps, sx, sx2 = (np.asarray(v, np.float64) for v in jax.device_get(
                fn(params, batch, jax.random.fold_in(base, done))))
            new = [eps * gb, sx, sx2]
            sums = new if sums is None else [a + b for a, b in zip(sums, new)]
            done += 1
            n = done * gb
            rec = {"step": int(step), "ema": True, "schedule": str(config.diffusion.schedule),
                   "num_timesteps": schedule.num_timesteps, "num_examples": n,
                   "batches": done, "complete": done == n_batches,
                   "sums": [v.tolist() for v in sums],
                   "eps_sq_norm": (sums[0] / n).tolist(),
                   "x0_var": float(np.mean(sums[2] / n - (sums[1] / n) ** 2))}
            if jax.process_index() == 0:
                paths.write_text(path, json.dumps(rec))   # readers never see half a file
    return rec


def eps_sq_norm_for(prior) -> tuple[np.ndarray, float]:
    """(eps_sq_norm [T], x0_range = sqrt(x0_var)) of a loaded prior (`checkpoint.Trained`);
    a clear error when missing."""
    path = stat_path(prior.workdir)
    rec = _read(path)
    how = (f"estimate it by re-running the prior's training command on its workdir with "
           f"--config.diffusion.var_type=analytic (python -m unclip_jax.main --config=... "
           f"--workdir={prior.workdir})")
    if rec is None:
        raise FileNotFoundError(f"Analytic-DPM variance asked for, but the prior has no statistic "
                                f"file {path}: {how}, or sample with --prior_var_type=fixed_small")
    if not rec.get("complete"):
        raise ValueError(f"the Analytic-DPM statistic {path} is incomplete ({rec.get('batches')} "
                         f"batches done): {how} to finish it")
    t = int(prior.config.diffusion.num_timesteps)
    eps = np.asarray(rec["eps_sq_norm"], np.float32)
    if eps.shape != (t,) or not np.all(np.isfinite(eps)):
        raise ValueError(f"{path} holds {eps.shape[0]} values (finite: "
                         f"{bool(np.all(np.isfinite(eps)))}); the prior trains with {t} "
                         f"timesteps: {how}")
    if rec.get("step") != prior.step:
        warnings.warn(f"{path} was estimated at step {rec.get('step')}; the prior sampling "
                      f"with it is step {prior.step}", stacklevel=2)
    return eps, float(np.sqrt(rec["x0_var"]))
