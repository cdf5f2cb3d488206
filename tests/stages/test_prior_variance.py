"""The diffusion prior's Analytic-DPM variance on data whose optimal variance is known.

Data x0 ~ N(MU, S^2 I) with the ideal x0 predictor standing in for the trained prior (the
closed form of diffusion/toy.py): E ||eps||^2 / d = (1 - ab) / (ab S^2 + 1 - ab) at every
timestep, and DDPM with the resulting variances samples N(MU, S^2) exactly, while the fixed
variances are biased by far more than the tolerance (tests/diffusion/test_sampler.py derives
both). The statistic goes through the stage's own estimate -> file -> load -> sample path.
"""
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unclip_jax import diffusion as D
from unclip_jax.diffusion.toy import gaussian_mixture_denoiser
from unclip_jax.models.prior import EmbeddingScaling, sample_prior
from unclip_jax.stages import prior_variance
from unclip_jax.stages.diffusion_prior import (ArrayIterator, scaling_from_config,
                                               schedule_from_config)

MU = np.array([1.0, -0.5, 0.25, 0.0, 0.5, -1.0, 0.3, 0.1], np.float32)
S, T, GB = 0.5, 1000, 2048
# The resume test compares runs with each other, not with the closed form: small batches
# (each 2048-example batch runs 1000 model calls: ~2.5 s of CPU at the tests' -O0).
SMALL_GB = 128


class IdealPrior(nn.Module):
    """The prior's interface (x_t, t, cond) -> x0 with the closed-form E[x0 | x_t]."""
    embed_dim: int = len(MU)

    def __call__(self, x_t, t, cond, train=False):
        return gaussian_mixture_denoiser(D.make_schedule("cosine", T), [MU], [S], [1.0],
                                         parameterization="x0")(x_t, t)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"image_embedding": (MU + S * rng.standard_normal((n, len(MU)))).astype(np.float32),
            "text_embedding": np.ones((n, len(MU)), np.float32),
            "token_embeddings": np.zeros((n, 2, 4), np.float32),
            "token_mask": np.ones((n, 2), bool)}


def _config(examples, gb=GB):
    return ml_collections.ConfigDict(dict(
        seed=0, train=dict(batch_size=gb),
        model=dict(scale_mode="fixed", scale=1.0, stats_path="", clamp=10.0),
        diffusion=dict(schedule="cosine", num_timesteps=T, var_type="analytic",
                       analytic_examples=examples),
        data=dict(name="synthetic")))


def _bundle(gb=GB):
    arrays = _data(4 * gb)
    stage = types.SimpleNamespace(make_data=lambda config, **kw: ArrayIterator(
        arrays, gb, 0, gb, kw["seed"]))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    return types.SimpleNamespace(stage=stage, model=IdealPrior(), mesh=mesh,
                                 batch_sharding=NamedSharding(mesh, P("data")))


def _estimate(config, workdir, step):
    """The stage's after-training call (stages.diffusion_prior.DiffusionPriorStage)."""
    gb = int(config.train.batch_size)
    return prior_variance.estimate(config, workdir, _bundle(gb), {}, step,
                                   schedule=schedule_from_config(config),
                                   scaling=scaling_from_config(config))


def _ideal_gamma(ab):
    return (1 - ab) / (ab * S ** 2 + 1 - ab)


@pytest.fixture(scope="module")
def estimated(tmp_path_factory):
    wd = tmp_path_factory.mktemp("prior")
    # RBG noise: XLA:CPU runs threefry's draws slowly at -O0 (each batch 1.3 s instead of 2.4 s
    # of CPU); the statistic's estimator is the same, only its random bits differ.
    with jax.default_prng_impl("rbg"):
        rec = _estimate(_config(2 * GB), str(wd), step=7)
    return wd, rec


def test_estimate_matches_the_closed_form_and_samples_the_target(estimated):
    wd, rec = estimated
    assert rec["complete"] and rec["num_examples"] == 2 * GB and rec["step"] == 7
    prior = types.SimpleNamespace(workdir=str(wd), step=7, config=_config(2 * GB))
    eps, x0_range = prior_variance.eps_sq_norm_for(prior)
    assert x0_range == pytest.approx(S, rel=0.02)   # the data's std: the bound's spread
    base = D.make_schedule("cosine", T)
    ab = np.cumprod(1 - np.asarray(base.betas, np.float64))
    # mean of 2 * 2048 * 8 squared Gaussians per timestep: relative s.e. 1.1%, 1000 timesteps
    np.testing.assert_allclose(eps, _ideal_gamma(ab), rtol=0.05)

    fast = D.respace(base, "50")
    kept = ab[np.asarray(fast.timestep_map)]
    np.testing.assert_allclose(   # the optimal variance itself, at the sampled steps
        D.analytic_variance(fast, eps[np.asarray(fast.timestep_map)]),
        D.analytic_variance(fast, _ideal_gamma(kept).astype(np.float32)), rtol=0.05, atol=1e-7)

    b = 8192
    batch = {k: jnp.asarray(v[:1]).repeat(b, 0) for k, v in _data(1).items()}

    def draw(var_type, eps_sq_norm=None, x0_range=None):
        return np.asarray(jax.jit(lambda r: sample_prior(
            IdealPrior(), {}, batch, r, schedule=base, scaling=EmbeddingScaling.fixed(1.0),
            steps="50", num_candidates=1, method="ddpm", var_type=var_type,
            eps_sq_norm=eps_sq_norm, x0_range=x0_range))(jax.random.key(3)), np.float64)

    def moments_ok(x):   # 65536 draws: std s.e. 0.28%, mean s.e. 0.0055 per dim
        se = S / np.sqrt(b)
        std = (x - x.mean(0)).std()
        return bool(np.all(np.abs(x.mean(0) - MU) < 5 * se)
                    and abs(std - S) < 5 * S / np.sqrt(2 * x.size)), std

    ok, std = moments_ok(draw("analytic", jnp.asarray(eps[np.asarray(fast.timestep_map)]),
                              x0_range))
    assert ok, std
    ok_small, std_small = moments_ok(draw("fixed_small"))   # 50-step beta_tilde: ~0.93 S
    assert not ok_small and std_small < 0.95 * S, std_small


def test_rerun_skips_and_an_interrupted_estimate_resumes(estimated, tmp_path, monkeypatch):
    wd, rec = estimated
    path = wd / prior_variance.STAT_FILE
    before = path.read_bytes()
    assert _estimate(_config(2 * GB), str(wd), step=7) == rec
    assert path.read_bytes() == before   # done: nothing recomputed or rewritten

    # An interrupted estimate resumed equals one run without interruption (smaller batches).
    g = SMALL_GB
    full = _estimate(_config(2 * g, g), str(tmp_path / "full"), step=7)
    real_write, calls = prior_variance.paths.write_text, []

    def write_then_die(p, text):   # killed right after the first batch is saved
        real_write(p, text)
        calls.append(json.loads(text))
        raise KeyboardInterrupt

    monkeypatch.setattr(prior_variance.paths, "write_text", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _estimate(_config(2 * g, g), str(tmp_path), step=7)
    monkeypatch.setattr(prior_variance.paths, "write_text", real_write)
    part = json.loads((tmp_path / prior_variance.STAT_FILE).read_text())
    assert not part["complete"] and part["batches"] == 1 and part["num_examples"] == g
    with pytest.raises(ValueError, match="incomplete"):  # refused for sampling meanwhile
        prior_variance.eps_sq_norm_for(types.SimpleNamespace(
            workdir=str(tmp_path), step=7, config=_config(2 * g, g)))
    resumed = _estimate(_config(2 * g, g), str(tmp_path), step=7)
    assert resumed["complete"] and resumed["num_examples"] == 2 * g
    np.testing.assert_allclose(resumed["eps_sq_norm"], full["eps_sq_norm"], rtol=1e-12)
    # a prior trained further (another step) is re-estimated, not served the stale statistic
    newer = _estimate(_config(g, g), str(tmp_path), step=9)
    assert newer["step"] == 9 and newer["num_examples"] == g


def test_missing_statistic_is_a_clear_error(tmp_path):
    prior = types.SimpleNamespace(workdir=str(tmp_path), step=1, config=_config(GB))
    with pytest.raises(FileNotFoundError, match="analytic_variance.json.*var_type=analytic"):
        prior_variance.eps_sq_norm_for(prior)
    cfg = _config(GB)
    cfg.diffusion.var_type = "optimal"
    with pytest.raises(ValueError, match="var_type 'optimal'"):
        prior_variance.configured_var_type(cfg)
