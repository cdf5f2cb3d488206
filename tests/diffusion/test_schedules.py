"""Noise schedules and respacing against closed forms and IDDPM's documented semantics."""
import math

import numpy as np
import pytest

from unclip_jax.diffusion import make_schedule, respace, space_timesteps


def _cosine_alpha_bar(u):
    return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2


@pytest.mark.parametrize("T", [1000, 64])
def test_cosine_matches_closed_form(T):
    s = make_schedule("cosine", T)
    t = np.arange(T)
    expect = _cosine_alpha_bar((t + 1) / T) / _cosine_alpha_bar(0.0)
    betas = np.asarray(s.betas)
    assert betas.max() <= 0.999 + 1e-7
    assert betas[-1] == pytest.approx(0.999)  # alpha_bar(1) = 0: the last beta is capped
    capped = np.nonzero(betas >= 0.999 - 1e-6)[0]
    ok = t < capped[0]  # before any cap, alpha_bar is the closed form exactly
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[ok], expect[ok], rtol=2e-5)
    np.testing.assert_allclose(np.asarray(s.sqrt_one_minus_alphas_cumprod) ** 2,
                               1 - np.asarray(s.alphas_cumprod), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(s.timestep_map), t)


def test_linear_scaled_to_any_T():
    for T, lo, hi in [(1000, 1e-4, 0.02), (250, 4e-4, 0.08)]:
        b = np.asarray(make_schedule("linear", T).betas)
        assert len(b) == T
        np.testing.assert_allclose([b[0], b[-1]], [lo, hi], rtol=1e-6)
        np.testing.assert_allclose(np.diff(b), (hi - lo) / (T - 1), rtol=1e-4)


def test_posterior_variance_formula():
    s = make_schedule("linear", 100)
    b = np.asarray(s.betas, np.float64)
    ab = np.cumprod(1 - b)
    pv = b[1:] * (1 - ab[:-1]) / (1 - ab[1:])
    np.testing.assert_allclose(np.asarray(s.posterior_variance)[1:], pv, rtol=1e-5)
    assert float(s.posterior_variance[0]) == 0.0
    # IDDPM clips log beta_tilde_0 = -inf to log beta_tilde_1
    np.testing.assert_allclose(np.asarray(s.posterior_log_variance_clipped)[[0, 1, 50]],
                               np.log(pv[[0, 0, 49]]), rtol=1e-5)


@pytest.mark.parametrize("spec", ["50", "ddim25", "10,10,3,2,2", "7"])
def test_respaced_alpha_bar_equals_original_at_kept_steps(spec):
    base = make_schedule("cosine", 1000)
    fast = respace(base, spec)
    kept = np.asarray(fast.timestep_map)
    assert np.all(np.diff(kept) > 0) and fast.num_timesteps == len(kept)
    np.testing.assert_allclose(np.asarray(fast.alphas_cumprod),
                               np.asarray(base.alphas_cumprod)[kept], rtol=1e-5)
    ab = np.asarray(base.alphas_cumprod, np.float64)[kept]
    np.testing.assert_allclose(np.asarray(fast.betas)[1:], 1 - ab[1:] / ab[:-1], rtol=1e-4)


def test_ddim_spacing_is_integer_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")  # no integer stride gives exactly 999 steps


def test_single_section_spans_first_to_last():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    gaps = np.diff(steps)
    assert set(gaps.tolist()) <= {4, 5}  # stride 999/249 = 4.01, rounded
    assert space_timesteps(1000, 250) == steps


def test_section_counts_iddpm_docstring_example():
    # IDDPM: "300 timesteps and section counts [10,15,20]: the first 100 timesteps are strided to
    # be 10 timesteps, the second 100 ... 15, and the final 100 ... 20."
    steps = np.array(space_timesteps(300, "10,15,20"))
    for lo, count in [(0, 10), (100, 15), (200, 20)]:
        sec = steps[(steps >= lo) & (steps < lo + 100)]
        assert len(sec) == count and sec[0] == lo and sec[-1] == lo + 99
    assert list(steps[:10]) == list(range(0, 100, 11))  # stride 99/9 = 11 exactly


def test_section_counts_hand_derived():
    # T=1000 in 5 sections of 200. 10 steps: stride 199/9 = 22.11 -> rounded multiples;
    # 3 steps: stride 99.5 -> 0, round(99.5)=100 (half to even), 199; 2 steps: ends.
    ten = [0, 22, 44, 66, 88, 111, 133, 155, 177, 199]
    expect = ten + [200 + i for i in ten] + [400, 500, 599, 600, 799, 800, 999]
    assert space_timesteps(1000, "10,10,3,2,2") == expect
    with pytest.raises(ValueError):
        space_timesteps(10, "6,1")  # 6 steps from a section of 5


def test_respace_twice_composes_timestep_map():
    base = make_schedule("linear", 1000)
    once = respace(base, "100")
    twice = respace(once, "ddim10")
    expect = np.asarray(once.timestep_map)[list(range(0, 100, 10))]
    np.testing.assert_array_equal(np.asarray(twice.timestep_map), expect)
    np.testing.assert_allclose(np.asarray(twice.alphas_cumprod),
                               np.asarray(base.alphas_cumprod)[expect], rtol=1e-5)
    assert math.isclose(float(twice.alphas_cumprod_prev[0]), 1.0)


def test_schedule_built_inside_a_trace_is_concrete():
    # Stages cache schedules; one first built inside jit must not hold tracers (a leak).
    import jax
    import jax.numpy as jnp

    from unclip_jax.diffusion import make_schedule

    holder = {}

    @jax.jit
    def f(x):
        holder["s"] = make_schedule("cosine", 10)
        return x + holder["s"].betas[0]

    f(jnp.zeros(()))
    assert not isinstance(holder["s"].betas, jax.core.Tracer)
    assert float(jax.jit(lambda x: x + holder["s"].betas[0])(jnp.zeros(()))) > 0
