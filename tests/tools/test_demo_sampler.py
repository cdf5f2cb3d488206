"""The toy demo runs end to end (its output on gs://) and its samplers land on the mixture they
were given."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.tools import demo_sampler
from unclip_jax.diffusion import make_schedule
from unclip_jax.diffusion.toy import gaussian_mixture_denoiser


def test_mixture_denoiser_single_component_is_gaussian_posterior_mean():
    sched = make_schedule("linear", 100)
    mu, s = np.array([[0.3, -0.7]], np.float32), np.array([0.4], np.float32)
    model = gaussian_mixture_denoiser(sched, mu, s, [1.0], parameterization="x0")
    x = jax.random.normal(jax.random.key(0), (5, 2))
    t = jnp.array([0, 10, 40, 70, 99])
    ab = np.cumprod(1 - np.asarray(sched.betas, np.float64))[np.asarray(t)][:, None]
    expect = mu + np.sqrt(ab) * s ** 2 * (np.asarray(x) - np.sqrt(ab) * mu) / (ab * s ** 2 + 1 - ab)
    np.testing.assert_allclose(model(x, t), expect, rtol=1e-4, atol=1e-5)


def test_demo_writes_plot_and_moments_to_gcs(tmp_path, monkeypatch):
    """The demo's --out on a gs:// URL (the GCS emulator): both files written there, none to a
    local folder named gs:; a missing bucket is named before any sampling."""
    import io

    import pytest
    from helpers.gcs import emulator
    from PIL import Image

    from unclip_jax import paths
    monkeypatch.chdir(tmp_path)
    with emulator() as bucket:
        with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
            demo_sampler.demo("gs://no-such-bucket/demo", steps=2)
        out = f"{bucket}/demo"
        demo_sampler.demo(out, steps=25, num_samples=3000, stat_samples=20000)
        png = Image.open(io.BytesIO(paths.path(f"{out}/samples.png").read_bytes()))
        res = json.loads(paths.path(f"{out}/moments.json").read_text())
    assert png.size == (5 * 300, 320)   # data + 4 samplers
    assert list(tmp_path.iterdir()) == []
    true = res["true"]
    for name in ("ddim_eta0_25", "ddpm_analytic_25", "ddpm_fixed_small_25"):
        got = res[name]
        # mass s.e. <= sqrt(0.25/3000) = 0.009; means of a spread-0.55 cloud: s.e. 0.01
        np.testing.assert_allclose(got["component_mass"], true["component_mass"], atol=0.05)
        np.testing.assert_allclose(got["mean"], true["mean"], atol=0.05)
        # 25 steps shrink components (see the demo's docstring) but keep them recognisable
        np.testing.assert_allclose(got["component_std"], true["component_std"], rtol=0.4)
