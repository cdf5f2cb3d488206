"""Forward process, parameterisation conversions and training losses against numpy / scipy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from unclip_jax import diffusion as D

T = 1000


def _np_cosine(T):
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(T)
    betas = np.minimum(1 - f((t + 1) / T) / f(t / T), 0.999)
    ab = np.cumprod(1 - betas)
    return betas, ab, np.append(1.0, ab[:-1])


@pytest.fixture(scope="module")
def sched():
    return D.make_schedule("cosine", T)


def _data(seed, shape=(4, 6, 3)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0 = jnp.clip(jax.random.normal(k1, shape) * 0.5, -1, 1)
    return x0, jax.random.normal(k2, shape)


def test_q_sample_and_conversions_round_trip(sched):
    x0, eps = _data(0)
    t = jnp.array([0, 10, 500, 999])
    _, ab, _ = _np_cosine(T)
    x_t = D.q_sample(sched, x0, t, eps)
    a = np.sqrt(ab[np.asarray(t)])[:, None, None]
    np.testing.assert_allclose(x_t, a * x0 + np.sqrt(1 - a ** 2) * eps, rtol=1e-5, atol=1e-6)
    v = D.v_from(sched, x0, eps, t)
    np.testing.assert_allclose(v, a * eps - np.sqrt(1 - a ** 2) * x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(D.x0_from_v(sched, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(D.eps_from_v(sched, x_t, t, v), eps, atol=1e-5)
    mid = jnp.array([10, 100, 500, 900])  # eps <-> x0 is ill-conditioned at the ends
    x_m = D.q_sample(sched, x0, mid, eps)
    np.testing.assert_allclose(D.predict_x0_from_eps(sched, x_m, mid, eps), x0, atol=1e-4)
    np.testing.assert_allclose(D.predict_eps_from_x0(sched, x_m, mid, x0), eps, atol=1e-4)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_mse_targets(sched, param):
    x0, eps = _data(1)
    t = jnp.array([3, 200, 700, 998])
    x_t = D.q_sample(sched, x0, t, eps)
    target = {"eps": eps, "x0": x0, "v": D.v_from(sched, x0, eps, t)}[param]
    loss, terms = D.diffusion_loss(sched, target, x0, x_t, t, eps, parameterization=param)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)
    delta = jnp.arange(4.0)[:, None, None] * 0.1
    loss, terms = D.diffusion_loss(sched, target + delta, x0, x_t, t, eps, parameterization=param)
    np.testing.assert_allclose(loss, (np.arange(4.0) * 0.1) ** 2, rtol=1e-5)
    assert set(terms) == {"mse", "loss"}


def _np_kl(m1, v1, m2, v2):
    # KL(N(m1, v1) || N(m2, v2)), textbook form
    return np.log(np.sqrt(v2) / np.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def test_hybrid_vlb_matches_numpy_kl(sched):
    x0, eps = _data(2)
    t = np.array([1, 40, 400, 950])
    x_t = D.q_sample(sched, x0, jnp.asarray(t), eps)
    rng = np.random.default_rng(0)
    eps_pred = np.asarray(eps) + 0.3 * rng.standard_normal(eps.shape).astype(np.float32)
    v = rng.uniform(-1, 1, eps.shape).astype(np.float32)
    out = jnp.concatenate([jnp.asarray(eps_pred), jnp.asarray(v)], axis=-1)
    loss, terms = D.diffusion_loss(sched, out, x0, x_t, jnp.asarray(t), eps,
                                   parameterization="eps", learned_variance=True)

    betas, ab, ab_prev = _np_cosine(T)
    b_, a_, ap = (arr[t][:, None, None] for arr in (betas, ab, ab_prev))
    xt, x0n = np.asarray(x_t, np.float64), np.asarray(x0, np.float64)
    post_var = b_ * (1 - ap) / (1 - a_)
    post_mean = lambda x0_: (np.sqrt(ap) * b_ * x0_ + np.sqrt(1 - b_) * (1 - ap) * xt) / (1 - a_)
    x0_hat = (xt - np.sqrt(1 - a_) * eps_pred) / np.sqrt(a_)
    frac = (v + 1) / 2
    model_var = np.exp(frac * np.log(b_) + (1 - frac) * np.log(post_var))
    kl = _np_kl(post_mean(x0n), post_var, post_mean(x0_hat), model_var)
    expect = kl.mean(axis=(1, 2)) / math.log(2)
    np.testing.assert_allclose(terms["vlb"], expect, rtol=1e-4, atol=1e-6)
    mse = ((eps_pred - np.asarray(eps)) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-5)
    # IDDPM hybrid: lambda = 0.001 times the VLB estimate T * L_t
    np.testing.assert_allclose(loss, mse + 0.001 * T * expect, rtol=1e-4)


def test_decoder_nll_at_t0_matches_scipy(sched):
    rng = np.random.default_rng(1)
    shape = (3, 8, 2)
    # data on the 256-level grid of [-1, 1], including both end bins
    x0 = rng.integers(0, 256, shape) / 127.5 - 1.0
    x0[0, 0, 0], x0[1, 0, 0] = -1.0, 1.0
    x0 = x0.astype(np.float32)
    t = np.zeros(3, np.int32)
    eps = rng.standard_normal(shape).astype(np.float32)
    x_t = D.q_sample(sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps))
    eps_pred = eps + 0.2 * rng.standard_normal(shape).astype(np.float32)
    v = rng.uniform(-1, 1, shape).astype(np.float32)
    out = jnp.concatenate([jnp.asarray(eps_pred), jnp.asarray(v)], axis=-1)
    _, terms = D.diffusion_loss(sched, out, jnp.asarray(x0), x_t, jnp.asarray(t),
                                jnp.asarray(eps), learned_variance=True)

    betas, ab, _ = _np_cosine(T)
    xt = np.asarray(x_t, np.float64)
    # at t = 0 the posterior mean is x0_hat itself; the variance interpolates log beta_0 and the
    # clipped log beta_tilde (beta_tilde_1, since beta_tilde_0 = 0)
    mean = (xt - np.sqrt(1 - ab[0]) * eps_pred) / np.sqrt(ab[0])
    bt1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    frac = (v + 1) / 2
    std = np.exp(0.5 * (frac * np.log(betas[0]) + (1 - frac) * np.log(bt1)))
    hi, lo = (x0 + 1 / 255 - mean) / std, (x0 - 1 / 255 - mean) / std
    p = np.where(x0 < -0.999, norm.cdf(hi),
                 np.where(x0 > 0.999, norm.sf(lo), norm.cdf(hi) - norm.cdf(lo)))
    expect = -np.log(np.maximum(p, 1e-12)).mean(axis=(1, 2)) / math.log(2)
    assert np.all(expect > 0.1)  # a non-trivial likelihood, not just the 1e-12 floor
    np.testing.assert_allclose(terms["vlb"], expect, rtol=1e-4)


def test_vlb_trains_only_the_variance_channels(sched):
    x0, eps = _data(3)
    t = jnp.array([0, 5, 300, 999])
    x_t = D.q_sample(sched, x0, t, eps)
    out = jnp.concatenate([eps + 0.5, jnp.full(eps.shape, 0.3)], axis=-1)

    def total(o):
        return jnp.sum(D.diffusion_loss(sched, o, x0, x_t, t, eps, learned_variance=True)[0])

    grad = jax.jit(jax.grad(total))(out)
    c = eps.shape[-1]
    n = eps.shape[1] * c  # mean over the non-batch dims of the prediction
    np.testing.assert_allclose(grad[..., :c], 2 * 0.5 / n * np.ones(eps.shape), rtol=1e-5)
    assert np.all(np.abs(np.asarray(grad[..., c:])) > 0)


def test_sample_timesteps_range():
    t = D.sample_timesteps(jax.random.key(0), 4096, 37)
    assert t.dtype == jnp.int32 and t.shape == (4096,)
    assert int(t.min()) == 0 and int(t.max()) == 36


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_min_snr_loss_is_min_snr_gamma_times_x0_mse(sched, param):
    # A prediction whose x0 is off by delta: every parameterization's min-SNR loss must equal
    # min(SNR, gamma) * mean(delta^2) (Hang et al. 2023), and without gamma the plain MSE.
    x0, noise = _data(3)
    t = jnp.array([5, 150, 400, 900])
    x_t = D.q_sample(sched, x0, t, noise)
    delta = 0.1 * jax.random.normal(jax.random.key(9), x0.shape)
    x0_hat = x0 + delta
    eps_hat = D.predict_eps_from_x0(sched, x_t, t, x0_hat)
    pred = {"eps": eps_hat, "x0": x0_hat, "v": D.v_from(sched, x0_hat, eps_hat, t)}[param]
    _, ab, _ = _np_cosine(T)
    snr = ab[np.asarray(t)] / (1 - ab[np.asarray(t)])
    x0_mse = np.mean(np.asarray(delta) ** 2, axis=(1, 2))
    for gamma in (1.0, 5.0):
        loss, terms = D.diffusion_loss(sched, pred, x0, x_t, t, noise, parameterization=param,
                                       min_snr_gamma=gamma)
        np.testing.assert_allclose(loss, np.minimum(snr, gamma) * x0_mse, rtol=2e-3)
        np.testing.assert_allclose(terms["mse"], D.diffusion_loss(
            sched, pred, x0, x_t, t, noise, parameterization=param)[0], rtol=1e-6)
    assert snr.min() < 1.0 < 5.0 < snr.max()     # both sides of gamma are exercised
