"""Diffusion prior: overfits a fixed nonlinear text -> image-embedding map; best-of-N reranking."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unclip_jax import diffusion
from unclip_jax.diffusion import diffusion_config
from unclip_jax.models import diffusion_prior_model_config
from unclip_jax.models.prior import EmbeddingScaling, best_of_n, sample_prior
from unclip_jax.stages.diffusion_prior import DiffusionPriorStage, synthetic_pairs

from helpers.models import OPTIMIZED

DIM, CTX, N = 16, 8, 16


def _config():
    c = ml_collections.ConfigDict()
    c.model = diffusion_prior_model_config(
        embed_dim=DIM, width=64, depth=2, heads=4, text_ctx=CTX, vocab_size=64, drop_prob=0.1,
        scale_mode="fixed", scale=float(np.sqrt(DIM)))
    c.diffusion = diffusion_config(schedule="cosine", num_timesteps=1000)
    c.data = dict(name="synthetic", num_examples=N, seed=0)
    c.train = dict(batch_size=N)
    return c


def _cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def trained():
    config = _config()
    stage = DiffusionPriorStage()
    stage.validate(config)
    model = stage.build_model(config)
    data = synthetic_pairs(N, DIM, CTX, 64, seed=0)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    tx = optax.adam(2e-3)

    @jax.jit   # one program (eagerly, init and adam's zeros compile one per op and shape)
    def init(rng):
        params = nn.meta.unbox(stage.init(model, rng, batch))["params"]
        return params, tx.init(params)

    params, opt = init(jax.random.PRNGKey(0))

    @functools.partial(jax.jit, compiler_options=OPTIMIZED)  # run 400 times
    def step(params, opt, rng):
        (loss, _), g = jax.value_and_grad(
            lambda p: stage.loss(model, p, batch, rng, config), has_aux=True)(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(400):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i + 1))
        losses.append(float(loss))
    return model, params, batch, losses


@pytest.fixture(scope="module")
def sample(trained):
    """sample_prior(model, params, batch, rng, **kw) of the trained prior, jitted (eagerly every
    op around the sampling loop compiles on its own)."""
    model, params, batch, _ = trained
    schedule = diffusion.make_schedule("cosine", 1000)

    @functools.partial(jax.jit, static_argnames=("steps", "guidance_scale", "num_candidates",
                                                 "method", "return_candidates"))
    def run(params, batch, rng, **kw):
        return sample_prior(model, params, batch, rng, schedule=schedule,
                            scaling=EmbeddingScaling.fixed(np.sqrt(DIM)), **kw)
    return lambda rng, **kw: run(params, batch, rng, **kw)


def test_prior_overfits_nonlinear_map(trained, sample):
    _, _, batch, losses = trained
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    z = sample(jax.random.PRNGKey(123), steps="32", guidance_scale=1.0, num_candidates=2)
    truth, z_t = np.asarray(batch["image_embedding"]), np.asarray(batch["text_embedding"])
    baseline = _cos(z_t, truth).mean()
    got = _cos(z, truth).mean()
    assert got > 0.8 and got > baseline + 0.6, (got, baseline)


def test_guided_sampling_runs_and_stays_close(trained, sample):
    batch = trained[2]
    z = sample(jax.random.PRNGKey(5), steps="16", guidance_scale=2.0, num_candidates=1,
               method="ddim")
    assert np.isfinite(np.asarray(z)).all()
    assert _cos(z, batch["image_embedding"]).mean() > 0.6


def test_text_dropout_changes_prediction(trained):
    model, params, batch, _ = trained
    cond = {"z_t": batch["text_embedding"] * 4, "tokens": batch["tokens"],
            "token_mask": batch["token_mask"]}
    x = jnp.zeros((N, DIM))
    t = jnp.full((N,), 500, jnp.int32)
    apply = jax.jit(model.apply)
    a = apply({"params": params}, x, t, dict(cond, drop=jnp.zeros(N, bool)))
    b = apply({"params": params}, x, t, dict(cond, drop=jnp.ones(N, bool)))
    # the null prediction is one vector for every caption; the conditional ones differ
    assert float(jnp.std(b, axis=0).max()) < 1e-5 and float(jnp.std(a, axis=0).mean()) > 0.1


def test_best_of_n_picks_larger_dot_product():
    rng = np.random.default_rng(0)
    z_t = rng.standard_normal((5, 8)).astype(np.float32)
    cands = rng.standard_normal((3, 5, 8)).astype(np.float32)
    got = np.asarray(best_of_n(jnp.asarray(cands), jnp.asarray(z_t)))
    for b in range(5):
        dots = [cands[n, b] @ z_t[b] for n in range(3)]
        np.testing.assert_array_equal(got[b], cands[int(np.argmax(dots)), b])
    # and it is what sample_prior returns among its candidates
    c2 = cands[:2]
    flipped = np.asarray(best_of_n(jnp.asarray(c2[::-1]), jnp.asarray(z_t)))
    np.testing.assert_array_equal(flipped, np.asarray(best_of_n(jnp.asarray(c2), jnp.asarray(z_t))))


def test_sample_prior_returns_best_candidate(trained, sample):
    batch = trained[2]
    best, cands = sample(jax.random.PRNGKey(9), steps="8", num_candidates=3,
                         return_candidates=True)
    dots = np.einsum("nbd,bd->nb", np.asarray(cands), np.asarray(batch["text_embedding"]))
    np.testing.assert_allclose(best, np.asarray(cands)[dots.argmax(0), np.arange(N)])
