"""Conditioning-image corruptions of the upsamplers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.data import degrade as D


def test_blur_kernel_sums_to_one_and_matches_numpy_gaussian():
    k = np.asarray(D.gaussian_kernel1d(3, 0.6))
    r = np.arange(3) - 1.0
    want = np.exp(-r ** 2 / (2 * 0.6 ** 2))
    np.testing.assert_allclose(k, want / want.sum(), rtol=1e-6)
    assert abs(k.sum() - 1) < 1e-6
    k7 = np.asarray(D.gaussian_kernel1d(7, 1.7))
    r = np.arange(7) - 3.0
    np.testing.assert_allclose(k7, np.exp(-r ** 2 / (2 * 1.7 ** 2)) / np.exp(
        -r ** 2 / (2 * 1.7 ** 2)).sum(), rtol=1e-6)


def test_gaussian_blur_matches_2d_numpy_convolution():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9, 10, 3)))
    got = np.asarray(D.gaussian_blur(jnp.asarray(x), 0.6, 3))
    k = np.asarray(D.gaussian_kernel1d(3, 0.6))
    k2 = np.outer(k, k)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    want = sum(k2[i, j] * xp[:, i:i + 9, j:j + 10] for i in range(3) for j in range(3))
    np.testing.assert_allclose(got, want, atol=1e-5)
    c = jnp.full((1, 8, 8, 3), 0.3)                                  # constants are preserved
    np.testing.assert_allclose(D.gaussian_blur(c, jnp.array([1.3]), 5), c, atol=1e-6)


def test_jpeg_quantisation_quality_controls_error():
    x = jax.random.uniform(jax.random.key(1), (2, 16, 24, 3), minval=-1, maxval=1)
    hi = float(jnp.abs(D.jpeg_quantise(x, 100.0) - x).mean())
    lo = float(jnp.abs(D.jpeg_quantise(x, 10.0) - x).mean())
    assert hi < 0.01 and lo > 0.1
    smooth = jnp.linspace(-0.8, 0.8, 16)[None, :, None, None] * jnp.ones((1, 16, 16, 3))
    assert float(jnp.abs(D.jpeg_quantise(smooth, 30.0) - smooth).max()) < 0.06


@pytest.mark.parametrize("kind", ["none", "blur", "bsr"])
def test_degraded_output_keeps_shape_and_range(kind):
    x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), minval=-1, maxval=1)
    f = jax.jit(lambda r, x: D.degrade(r, x, kind))
    y = f(jax.random.key(3), x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    if kind == "none":
        np.testing.assert_array_equal(y, x)
    else:
        assert float(jnp.abs(y - x).mean()) > 0.05   # white noise is visibly smoothed
    if kind == "bsr":   # fresh randomness per rng, and per example
        y2 = f(jax.random.key(4), x)
        assert float(jnp.abs(y2 - y).max()) > 1e-3
        assert float(jnp.abs(y - x).mean(axis=(1, 2, 3)).std()) > 1e-4


def test_unknown_degradation_names_the_config_field():
    with pytest.raises(ValueError, match="config.diffusion.degrade"):
        D.degrade(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), "jpeg2000")
