"""Samplers against data whose ideal denoiser is closed-form: x0 ~ N(mu, s^2 I).

With x_t = a x0 + b eps (a^2 = alpha_bar, b^2 = 1 - a^2), x_t ~ N(a mu, V I), V = a^2 s^2 + b^2,
  E[x0 | x_t] = mu + a s^2 (x_t - a mu) / V,   E[eps | x_t] = b (x_t - a mu) / V.
Every sampler is then a linear-Gaussian chain: its output mean is exactly mu (each step's mean map
is an exact conditional expectation) and its output variance follows a scalar recursion, computed
below in float64 from the textbook DDPM / DDIM update rules. That gives each sampler's exact
finite-step std, so the tests compare samples with it to a few standard errors instead of
loosening tolerances to hide discretisation bias (e.g. 50-step fixed_small gives ~0.93 s, fixed
_large ~1.02 s, DDIM eta=0 ~0.97 s); the Analytic-DPM / ideal learned-range variance is exact
(the true reverse conditional is Gaussian), so there the expected std is s up to the noiseless
last step (~1e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as D

MU = np.array([1.0, -0.5, 0.25, 0.0, 0.5, -1.0, 0.3, 0.1], np.float32)
S = 0.5
B = 8192  # B * 8 dims = 65536 draws: std standard error 0.28%, per-dim mean s.e. ~0.0055


@pytest.fixture(scope="module")
def base():
    return D.make_schedule("cosine", 1000)


@pytest.fixture(scope="module")
def fast(base):
    return D.respace(base, "50")


def ideal_model(base, param, mu=MU, s=S):
    """Ideal prediction at training timestep t, written from the closed form above."""
    ab_all = base.alphas_cumprod

    def model_fn(x, t, cond=None):
        ab = ab_all[t][:, None]
        a, b = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        m = mu if cond is None else cond
        V = ab * s ** 2 + 1 - ab
        x0 = m + a * s ** 2 * (x - a * m) / V
        eps = b * (x - a * m) / V
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[param]

    return model_fn


def kept_alpha_bars(base, fast):
    ab = np.cumprod(1 - np.asarray(base.betas, np.float64))
    return ab[np.asarray(fast.timestep_map)]


def ideal_gamma(ab, s=S):
    """E||E[eps|x_t]||^2 / d = b^2 / V."""
    return (1 - ab) / (ab * s ** 2 + 1 - ab)


def np_optimal_var(ab, s=S):
    """Analytic-DPM's sigma*^2 with lambda^2 = beta_tilde, in its original (uncancelled) form."""
    ab_prev = np.append(1.0, ab[:-1])
    alpha = ab / ab_prev
    lam2 = (1 - alpha) * (1 - ab_prev) / (1 - ab)
    bracket = np.sqrt((1 - ab) / alpha) - np.sqrt(np.maximum(1 - ab_prev - lam2, 0))
    return lam2 + bracket ** 2 * (1 - ideal_gamma(ab, s))


def expected_std(ab, kind, eta=0.0, s=S):
    """Output std of the linear-Gaussian sampler chain started from N(0, 1)."""
    ab_prev = np.append(1.0, ab[:-1])
    var = 1.0
    opt = np_optimal_var(ab, s)
    for n in range(len(ab) - 1, -1, -1):
        a, ap = ab[n], ab_prev[n]
        V = a * s ** 2 + 1 - a
        k_x0, k_eps = np.sqrt(a) * s ** 2 / V, np.sqrt(1 - a) / V  # d x0_hat/dx, d eps_hat/dx
        beta = 1 - a / ap
        if kind == "ddim":
            sig2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
            gain = np.sqrt(ap) * k_x0 + np.sqrt(1 - ap - sig2) * k_eps
        else:  # DDPM posterior mean: sqrt(ab_prev) beta/(1-ab) x0 + sqrt(alpha)(1-ab_prev)/(1-ab) x
            gain = np.sqrt(ap) * beta / (1 - a) * k_x0 + np.sqrt(1 - beta) * (1 - ap) / (1 - a)
            sig2 = {"fixed_small": beta * (1 - ap) / (1 - a), "fixed_large": beta,
                    "optimal": opt[n]}[kind]
        var = gain ** 2 * var + (sig2 if n > 0 else 0.0)
    return np.sqrt(var)


def check_moments(x, std_expect, n_se=5.0):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x))
    se_mean = std_expect / np.sqrt(x.shape[0])
    np.testing.assert_array_less(np.abs(x.mean(0) - MU), n_se * se_mean)
    std = (x - x.mean(0)).std()
    assert abs(std - std_expect) < n_se * std_expect / np.sqrt(2 * x.size), (std, std_expect)


CASES = [  # (parameterization, method, var_type, eta)
    ("eps", "ddpm", "fixed_small", 0.0),
    ("eps", "ddpm", "fixed_large", 0.0),
    ("eps", "ddim", None, 0.0),
    ("eps", "ddim", None, 1.0),
    ("eps", "ddpm", "analytic", 0.0),
    ("eps", "ddpm", "learned_range", 0.0),
    ("x0", "ddpm", "fixed_small", 0.0),
    ("x0", "ddim", None, 0.0),
    ("x0", "ddim", None, 0.5),
    ("v", "ddpm", "fixed_large", 0.0),
    ("v", "ddim", None, 0.0),
    ("v", "ddpm", "learned_range", 0.0),
]


@pytest.mark.parametrize("param,method,var_type,eta", CASES)
def test_ideal_denoiser_moments(base, fast, param, method, var_type, eta):
    ab = kept_alpha_bars(base, fast)
    model_fn = ideal_model(base, param)
    kw = {}
    if var_type == "analytic":
        kw["eps_sq_norm"] = jnp.asarray(ideal_gamma(ab), jnp.float32)
    if var_type == "learned_range":
        # the ideal v puts the learned variance at the optimal one: log sigma*^2 =
        # f log beta + (1 - f) log beta_tilde_clipped, f = (v + 1)/2 (may leave [-1, 1])
        ab_prev = np.append(1.0, ab[:-1])
        beta = 1 - ab / ab_prev
        bt = beta * (1 - ab_prev) / (1 - ab)
        bt[0] = bt[1]
        f = (np.log(np_optimal_var(ab)) - np.log(bt)) / (np.log(beta) - np.log(bt))
        v_of_t = np.zeros(1000, np.float32)
        v_of_t[np.asarray(fast.timestep_map)] = 2 * f - 1  # indexed by the TRAINING timestep
        v_of_t = jnp.asarray(v_of_t)
        inner = model_fn
        model_fn = lambda x, t, c: jnp.concatenate(
            [inner(x, t, c), jnp.broadcast_to(v_of_t[t][:, None], x.shape)], -1)
    run = jax.jit(lambda rng: D.sample(
        model_fn, fast, (B, len(MU)), rng, method=method, eta=eta, parameterization=param,
        var_type=var_type or "fixed_small", **kw))
    x = run(jax.random.key(7))
    if method == "ddim":
        std = expected_std(ab, "ddim", eta)
    else:
        std = expected_std(ab, "optimal" if var_type in ("analytic", "learned_range") else var_type)
    if var_type in ("analytic", "learned_range"):
        assert abs(std / S - 1) < 1e-3  # exact sampler: the recursion itself says so
    check_moments(x, std)


def test_fixed_variances_are_biased_as_predicted(base, fast):
    # guards the test above against vacuous tolerances: the schemes differ by far more than 5 s.e.
    ab = kept_alpha_bars(base, fast)
    small, large = expected_std(ab, "fixed_small"), expected_std(ab, "fixed_large")
    ddim0 = expected_std(ab, "ddim", 0.0)
    se = S / np.sqrt(2 * B * len(MU))
    assert small < ddim0 < S < large
    assert min(ddim0 - small, large - S, S - ddim0) > 6 * se
    np.testing.assert_allclose(expected_std(ab, "ddim", 1.0), small, rtol=1e-9)  # eta=1 = DDPM


def test_model_sees_training_timesteps(base):
    fast = D.respace(base, "ddim10")
    seen = []

    def model_fn(x, t, cond):
        jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t, ordered=True)
        assert t.dtype == jnp.int32 and t.shape == (x.shape[0],)
        return jnp.zeros_like(x)

    jax.block_until_ready(jax.jit(lambda r: D.sample(model_fn, fast, (3, 2), r, method="ddpm"))(
        jax.random.key(0)))
    jax.effects_barrier()
    assert [int(s[0]) for s in seen] == list(range(900, -1, -100))
    assert all(np.all(s == s[0]) for s in seen)


def test_ddim_inversion_reconstructs(base):
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(MU + S * rng.standard_normal((512, len(MU))), jnp.float32)
    model_fn = ideal_model(base, "eps")
    errs = {}
    for spec in ("250", "1000"):
        sched = D.respace(base, spec)
        x_T = jax.jit(lambda x, sc: D.ddim_invert(model_fn, sc, x))(x0, sched)
        x_rec = jax.jit(lambda z, sc: D.sample(model_fn, sc, x0.shape, None, x_T=z))(x_T, sched)
        errs[spec] = float(jnp.sqrt(jnp.mean((x_rec - x0) ** 2)))
        # the inverted latents look like the prior N(0, 1)
        assert abs(float(x_T.std()) - 1) < 0.03 and abs(float(x_T.mean())) < 0.05
    # 1000 steps: rms error 0.3% of s; the one-step lag error shrinks ~1/N (250 -> 1000: ~4x)
    assert errs["1000"] < 0.003 * S * 2 and errs["250"] / errs["1000"] > 3, errs


def _cond_model(base, learned_sigma=False):
    """eps model conditioned on cond = {"mu": [B, D]}; v channels depend on the condition."""
    inner = ideal_model(base, "eps")

    def model_fn(x, t, cond):
        eps = inner(x, t, cond["mu"])
        if not learned_sigma:
            return eps
        return jnp.concatenate([eps, jnp.tanh(cond["mu"]) * jnp.ones_like(x)], -1)

    return model_fn


@pytest.mark.parametrize("method,var_type", [("ddim", "fixed_small"),
                                             ("ddpm", "learned_range")])
def test_guidance(base, method, var_type):
    fast = D.respace(base, "20")
    ls = var_type == "learned_range"
    model_fn = _cond_model(base, ls)
    b, d = 16, len(MU)
    cond = {"mu": jnp.broadcast_to(jnp.asarray(MU), (b, d))}
    uncond = {"mu": jnp.zeros((b, d))}
    kw = {"method": method, "var_type": var_type, "eta": 0.5, "learned_sigma": ls}
    rng = jax.random.key(3)

    shapes = []

    def counting(x, t, c):
        shapes.append(x.shape)
        return model_fn(x, t, c)

    run = lambda f, *a, **k: jax.jit(lambda r: D.sample(f, fast, (b, d), r, *a, **k, **kw))(rng)
    plain = run(model_fn, cond)
    g1 = run(counting, cond, uncond=uncond, guidance_scale=1.0)
    assert shapes == [(2 * b, d)]  # traced once in the scan, on the doubled batch
    np.testing.assert_allclose(g1, plain, atol=1e-5)

    def manual(x, t, c):  # guidance written out with two calls; v from the conditional call
        oc, ou = model_fn(x, t, cond), model_fn(x, t, uncond)
        if ls:
            e = ou[..., :d] + 3.0 * (oc[..., :d] - ou[..., :d])
            return jnp.concatenate([e, oc[..., d:]], -1)
        return ou + 3.0 * (oc - ou)

    g3 = run(model_fn, cond, uncond=uncond, guidance_scale=3.0)
    ref = run(manual, None)
    np.testing.assert_allclose(g3, ref, atol=1e-5)
    assert float(jnp.abs(g3 - plain).max()) > 0.1


def test_threshold_functions():
    x = jnp.stack([jnp.linspace(-3.0, 3.0, 1001), jnp.linspace(-0.5, 0.5, 1001)])
    clipped = D.threshold_x0(x, clip_x0=1.0)
    np.testing.assert_allclose(clipped[0], np.clip(np.linspace(-3, 3, 1001), -1, 1), atol=1e-6)
    np.testing.assert_allclose(clipped[1], x[1])
    dyn = D.threshold_x0(x, dynamic_threshold=0.9)
    # row 0: the 90th percentile of |x| is 2.7 -> clip to [-2.7, 2.7] and divide by 2.7
    lin = np.linspace(-3, 3, 1001)
    np.testing.assert_allclose(dyn[0], np.clip(lin, -2.7, 2.7) / 2.7, atol=1e-5)
    # row 1 lies inside [-1, 1]: s = max(percentile, 1) = 1 leaves it alone
    np.testing.assert_allclose(dyn[1], x[1], atol=1e-7)
    # with clip_x0 = c, the threshold floor and output range are c
    dyn2 = D.threshold_x0(x, clip_x0=2.0, dynamic_threshold=0.9)
    np.testing.assert_allclose(dyn2[0], np.clip(lin, -2.7, 2.7) * 2.0 / 2.7, atol=1e-5)


def test_sampler_clipping_and_trajectory(base):
    fast = D.respace(base, "10")
    model_fn = lambda x, t, c: 4.0 * x  # x0 predictions far outside [-1, 1]
    seen = {}
    cb = lambda n, x, x0: seen.__setitem__(int(n), np.asarray(x0))
    at = (9, 5, 0)
    for kw in ({"clip_x0": 1.0}, {"dynamic_threshold": 0.8}):
        seen.clear()
        run = jax.jit(lambda r, kw=kw: D.sample(model_fn, fast, (4, 64), r, method="ddpm",
                                         parameterization="x0", trajectory_at=at, callback=cb,
                                         **kw))
        x, traj = run(jax.random.key(0))
        jax.effects_barrier()
        assert traj.shape == (3, 4, 64) and sorted(seen) == list(range(10))
        for k, n in enumerate(at):
            np.testing.assert_allclose(traj[k], seen[n], atol=1e-6)
        assert float(jnp.abs(traj).max()) <= 1.0 + 1e-6
        assert float(jnp.abs(x).max()) <= 1.0 + 1e-5  # last step returns the clipped x0
        assert float(jnp.abs(traj[0]).max()) > 0.99  # it was clipped, not tiny
    no_clip = jax.jit(lambda r: D.sample(model_fn, fast, (4, 64), r, method="ddpm",
                                         parameterization="x0"))(jax.random.key(0))
    assert float(jnp.abs(no_clip).max()) > 2.0


def test_estimate_eps_sq_norm_matches_closed_form(base, fast):
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(MU + S * rng.standard_normal((4096, len(MU))), jnp.float32)
    est = jax.jit(lambda x, r: D.estimate_eps_sq_norm(
        ideal_model(base, "x0"), fast, x, r, parameterization="x0"))(x0, jax.random.key(1))
    expect = ideal_gamma(kept_alpha_bars(base, fast))
    # mean of 32768 squared Gaussians: relative s.e. sqrt(2/32768) = 0.8%
    np.testing.assert_allclose(est, expect, rtol=0.04)
    np.testing.assert_allclose(D.analytic_variance(fast, jnp.asarray(expect, jnp.float32)),
                               np_optimal_var(kept_alpha_bars(base, fast)), rtol=1e-3)


def test_ddim_with_clipping_follows_hand_computed_steps(base):
    # two steps (t = 500 then t = 0); the clipped x0 must also set eps, so x_{t-1} stays on the
    # line through x0 and x_t (IDDPM recomputes eps from the clipped x0)
    fast = D.respace(base, "ddim2")
    np.testing.assert_array_equal(np.asarray(fast.timestep_map), [0, 500])
    ab = kept_alpha_bars(base, fast)
    x_T = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    # x0 prediction 4x at t = 500 (mostly clipped), 0.5x at t = 0 (inside the range)
    model_fn = lambda x, t, c: jnp.where(t[:, None] > 250, 4.0, 0.5) * x
    out = jax.jit(lambda z: D.sample(model_fn, fast, z.shape, None, x_T=z, parameterization="x0",
                                     clip_x0=1.0))(jnp.asarray(x_T))
    x0c = np.clip(4.0 * x_T.astype(np.float64), -1, 1)
    eps = (x_T - np.sqrt(ab[1]) * x0c) / np.sqrt(1 - ab[1])
    x_mid = np.sqrt(ab[0]) * x0c + np.sqrt(1 - ab[0]) * eps
    np.testing.assert_allclose(out, np.clip(0.5 * x_mid, -1, 1), atol=1e-5)


def test_analytic_variance_data_range_bound(base, fast):
    ab = kept_alpha_bars(base, fast)
    ab_prev = np.append(1.0, ab[:-1])
    lam2 = (1 - ab / ab_prev) * (1 - ab_prev) / (1 - ab)
    # Analytic-DPM Thm 2 for data in [-r, r]: lam2 + (sqrt(abp) - sqrt(1-abp-lam2) sqrt(ab/(1-ab)))^2 r^2
    r = 1.5
    bound = lam2 + (np.sqrt(ab_prev) - np.sqrt(1 - ab_prev - lam2) * np.sqrt(ab / (1 - ab))) ** 2 * r ** 2
    worst = np.asarray(D.analytic_variance(fast, jnp.zeros(len(ab)), x0_range=r))  # eps norm 0
    free = np.asarray(D.analytic_variance(fast, jnp.zeros(len(ab))))
    np.testing.assert_allclose(worst, np.minimum(bound, free), rtol=1e-3)
    assert worst[-1] < 1e-4 * free[-1] and np.all(worst[-10:] < free[-10:])  # bites when noisy
    # the ideal (Gaussian) statistic already satisfies the bound: nothing changes
    g = jnp.asarray(ideal_gamma(ab), jnp.float32)
    np.testing.assert_allclose(D.analytic_variance(fast, g, x0_range=r),
                               D.analytic_variance(fast, g), rtol=1e-6)


def test_sharded_batch_matches_single_device(base):
    from unclip_jax import parallel
    mesh = parallel.make_mesh({"data": -1})
    fast = D.respace(base, "10")
    model_fn = _cond_model(base)
    b, d = 16, len(MU)
    x_T = jax.random.normal(jax.random.key(0), (b, d))
    cond = {"mu": jnp.broadcast_to(jnp.asarray(MU), (b, d))}
    uncond = {"mu": jnp.zeros((b, d))}
    run = jax.jit(lambda z, c, u, r: D.sample(model_fn, fast, (b, d), r, c, uncond=u,
                                              guidance_scale=2.0, method="ddpm", x_T=z))
    ref = run(x_T, cond, uncond, jax.random.key(1))
    shard = parallel.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        out = run(*jax.device_put((x_T, cond, uncond), shard), jax.random.key(1))
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(out, ref, atol=1e-5)
