"""AR prior: codec round trip, overfitting a fixed nonlinear map, top-half dot token, top-k."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unclip_jax.models import ar_prior_model_config
from unclip_jax.models.ar_prior import ARCodec, fit_codec, filter_logits, sample_ar_prior
from unclip_jax.stages.ar_prior import ARPriorStage
from unclip_jax.stages.diffusion_prior import synthetic_pairs

from helpers.models import OPTIMIZED

DIM, CTX, N, K, BUCKETS = 16, 8, 16, 10, 8


def _cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_codec_orders_components_and_roundtrips(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4096, 6)) * np.array([5, 3, 2, 1, 0.1, 0.05])
    z_t = rng.standard_normal((4096, 6))
    codec = fit_codec(z, z_t, k=4, num_buckets=64)
    assert np.all(np.diff(codec.pca.eigenvalues) <= 0)
    tokens = codec.encode(z, z_t)
    assert tokens.shape == (4096, 5) and tokens.dtype == np.int32
    # equal-mass buckets: each PC bucket holds ~1/64 of the data
    counts = np.bincount(tokens[:, 1], minlength=64)
    assert counts.min() >= 40 and counts.max() <= 90
    rec = codec.decode(tokens)
    rel = np.sum((rec - z) ** 2) / np.sum((z - z.mean(0)) ** 2)
    assert rel < 0.01  # the two dropped components hold ~0.03% of the variance
    dot_rec = codec.dot_quantizer.dequantize(tokens[:, :1])[:, 0]
    dot = np.sum(z * z_t, 1)
    assert np.corrcoef(dot_rec, dot)[0, 1] > 0.99
    codec.save(str(tmp_path / "c.npz"))
    back = ARCodec.load(str(tmp_path / "c.npz"))
    np.testing.assert_array_equal(back.encode(z[:10], z_t[:10]), tokens[:10])
    np.testing.assert_allclose(back.decode(tokens[:10]), rec[:10], atol=1e-6)


def test_filter_logits_top_k():
    lg = jnp.array([[1.0, 3.0, 2.0, 0.0]])
    out = filter_logits(lg, temperature=0.5, top_k=2)
    np.testing.assert_allclose(out[0, 1:3], [6.0, 4.0])
    assert np.isneginf(np.asarray(out)[0, [0, 3]]).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    c = ml_collections.ConfigDict()
    c.model = ar_prior_model_config(
        embed_dim=DIM, pca_components=K, num_buckets=BUCKETS, text_ctx=CTX, vocab_size=64,
        enc_width=64, enc_depth=1, enc_heads=4, dec_width=64, dec_depth=2, dec_heads=4,
        drop_prob=0.1, codec_path=str(tmp_path_factory.mktemp("ar") / "codec.npz"))
    c.data = dict(name="synthetic", num_examples=N, seed=0)
    c.train = dict(batch_size=N)
    stage = ARPriorStage()
    stage.validate(c)
    model = stage.build_model(c)
    it = stage.make_data(c, split="train", process_index=0, process_count=1,
                         local_batch_size=N, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    tx = optax.adam(2e-3)

    @jax.jit   # one program (eagerly, init and adam's zeros compile one per op and shape)
    def init(rng):
        params = nn.meta.unbox(stage.init(model, rng, batch))["params"]
        return params, tx.init(params)

    params, opt = init(jax.random.PRNGKey(0))

    @functools.partial(jax.jit, compiler_options=OPTIMIZED)  # run 250 times
    def step(params, opt, rng):
        (loss, m), g = jax.value_and_grad(
            lambda p: stage.loss(model, p, batch, rng, c), has_aux=True)(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, loss

    losses = [float(step(params, opt, jax.random.PRNGKey(0))[2])]
    for i in range(250):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i + 1))
        losses.append(float(loss))
    from unclip_jax.stages.ar_prior import get_codec, text_scale
    return model, params, batch, get_codec(c), losses, text_scale(c)


@pytest.fixture(scope="module")
def sample(trained):
    """sample_ar_prior(model, params, batch, rng, **kw) of the trained prior, jitted: one program
    per (guidance, dot_top_half, kv_cache), shared by the tests (the temperature is traced)."""
    model, params, batch, _, _, ts = trained

    @functools.partial(jax.jit, static_argnames=("guidance_scale", "dot_top_half", "kv_cache"))
    def run(params, batch, rng, temperature, guidance_scale=1.0, dot_top_half=True,
            kv_cache=True):
        return sample_ar_prior(model, params, batch, rng, temperature=temperature,
                               guidance_scale=guidance_scale, dot_top_half=dot_top_half,
                               text_scale=ts, kv_cache=kv_cache)
    return lambda rng, **kw: np.asarray(run(params, batch, rng, **kw))


@pytest.fixture(scope="module")
def apply(trained):
    """model.apply(params, *args, method=m) of the trained prior, jitted."""
    model, params = trained[:2]
    run = jax.jit(lambda p, m, *a: model.apply({"params": p}, *a, method=m), static_argnums=1)
    return lambda m, *a: run(params, m, *a)


def test_ar_prior_overfits_nonlinear_map(trained, sample):
    _, _, batch, codec, losses, _ = trained
    assert losses[-1] < 0.2 * losses[0]
    truth = synthetic_pairs(N, DIM, CTX, 64)
    order = [int(np.argmin(np.abs(truth["text_embedding"] - row).sum(1)))
             for row in np.asarray(batch["text_embedding"])]  # the iterator shuffles
    truth = {k: v[order] for k, v in truth.items()}
    z = codec.decode(sample(jax.random.PRNGKey(3), temperature=1.0, dot_top_half=False))
    ceiling = _cos(codec.decode(np.asarray(batch["ar_tokens"])), truth["image_embedding"]).mean()
    baseline = _cos(truth["text_embedding"], truth["image_embedding"]).mean()
    got = _cos(z, truth["image_embedding"]).mean()
    assert got > 0.9 * ceiling and got > baseline + 0.5, (got, ceiling, baseline)


def test_dot_token_from_top_half_and_guidance(trained, sample, apply):
    # The dot token comes from at or above the median of the model's own (guided, tempered)
    # distribution for each caption; unrestricted sampling goes below it.
    from unclip_jax.models.ar_prior import ARPrior, _cond
    _, _, batch, _, _, ts = trained
    temp, g = 4.0, 1.5  # a hot distribution: the half-split matters for every caption
    kw = dict(temperature=temp, guidance_scale=g)
    tokens = sample(jax.random.PRNGKey(4), dot_top_half=True, **kw)
    assert tokens.min() >= 0 and tokens.max() < BUCKETS
    cond = _cond(batch, ts)
    both = jax.tree.map(lambda x: jnp.concatenate([x, x], 0), cond)
    both["drop"] = jnp.arange(2 * N) >= N
    prefix, mask = apply(ARPrior.prefix, both)
    lg = np.asarray(apply(ARPrior.logits, prefix, mask,
                          jnp.zeros((2 * N, K + 1), jnp.int32))[:, 0])
    guided = (lg[N:] + g * (lg[:N] - lg[N:])) / temp
    p = np.exp(guided - guided.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    median = (np.cumsum(p, -1) >= 0.5).argmax(-1)
    assert (tokens[:, 0] >= median).all()
    free = np.concatenate([sample(jax.random.PRNGKey(5 + i), dot_top_half=False, **kw)[:, 0]
                           for i in range(4)])
    assert (free < np.tile(median, 4)).any()  # the restriction is what keeps them up


def test_upper_half_keeps_the_buckets_from_the_median_up():
    from unclip_jax.models.ar_prior import upper_half

    p = np.array([0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1])  # cdf 0.1 0.2 0.4 0.6 ...: median 3
    lg = np.asarray(upper_half(jnp.log(jnp.asarray(p))[None]))[0]
    assert np.isinf(lg[:3]).all() and np.isfinite(lg[3:]).all()
    kept = np.exp(lg[3:]) / np.exp(lg[3:]).sum()
    np.testing.assert_allclose(kept, p[3:] / p[3:].sum(), rtol=1e-5)  # renormalised, not reshaped
    # Mass piled on the top bucket: the half is that bucket alone, wherever the index midpoint is.
    q = np.full(8, 0.02)
    q[-1] = 1 - 0.14
    assert np.isfinite(np.asarray(upper_half(jnp.log(jnp.asarray(q))))).sum() == 1


def test_token_j_is_predicted_from_earlier_tokens_only(trained, apply):
    # Teacher-forced logits at position j must not move when tokens j, j+1, ... change.
    from unclip_jax.models.ar_prior import ARPrior, _cond
    _, _, batch, _, _, ts = trained
    cond = dict(_cond(batch, ts), drop=jnp.zeros((N,), bool))
    prefix, mask = apply(ARPrior.prefix, cond)
    tokens = batch["ar_tokens"]
    j0 = 5
    other = tokens.at[:, j0:].set((tokens[:, j0:] + 7) % BUCKETS)
    a = np.asarray(apply(ARPrior.logits, prefix, mask, tokens))
    b = np.asarray(apply(ARPrior.logits, prefix, mask, other))
    np.testing.assert_allclose(a[:, :j0 + 1], b[:, :j0 + 1], atol=1e-5)
    assert np.abs(a[:, j0 + 1:] - b[:, j0 + 1:]).max() > 1e-3  # later positions do see them


def test_kv_cache_samples_the_same_tokens(sample):
    # The cached decoder (prefix once, one position per token) against the reference that re-runs
    # the whole decoder per token: same rng, same tokens; the trained model's peaked logits make
    # every sampled position depend on the earlier ones.
    kw = dict(temperature=1.0, guidance_scale=1.5, dot_top_half=False)  # guided: doubled batch
    cached, full = (sample(jax.random.PRNGKey(6), kv_cache=c, **kw) for c in (True, False))
    np.testing.assert_array_equal(cached, full)
    assert len(np.unique(cached[:, 1:])) > BUCKETS // 2     # not a degenerate constant sequence
