"""AR prior: codec round trip, overfitting a fixed nonlinear map, top-half dot token, top-k."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unclip_jax.models.ar_prior import ARCodec, fit_codec, filter_logits, sample_ar_prior
from unclip_jax.stages.ar_prior import ARPriorStage
from unclip_jax.stages.diffusion_prior import synthetic_pairs

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
    c.model = dict(embed_dim=DIM, pca_components=K, num_buckets=BUCKETS, text_ctx=CTX,
                   vocab_size=64, enc_width=64, enc_depth=1, enc_heads=4, dec_width=64,
                   dec_depth=2, dec_heads=4, drop_prob=0.1,
                   codec_path=str(tmp_path_factory.mktemp("ar") / "codec.npz"))
    c.data = dict(name="synthetic", num_examples=N, seed=0)
    c.train = dict(batch_size=N)
    stage = ARPriorStage()
    stage.validate(c)
    model = stage.build_model(c)
    it = stage.make_data(c, split="train", process_index=0, process_count=1,
                         local_batch_size=N, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    params = nn.meta.unbox(stage.init(model, jax.random.PRNGKey(0), batch))["params"]
    tx = optax.adam(2e-3)
    opt = tx.init(params)

    @jax.jit
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


def test_ar_prior_overfits_nonlinear_map(trained):
    model, params, batch, codec, losses, ts = trained
    assert losses[-1] < 0.2 * losses[0]
    truth = synthetic_pairs(N, DIM, CTX, 64)
    order = [int(np.argmin(np.abs(truth["text_embedding"] - row).sum(1)))
             for row in np.asarray(batch["text_embedding"])]  # the iterator shuffles
    truth = {k: v[order] for k, v in truth.items()}
    tokens = sample_ar_prior(model, params, batch, jax.random.PRNGKey(3), temperature=1.0,
                             dot_top_half=False, text_scale=ts)
    z = codec.decode(np.asarray(tokens))
    ceiling = _cos(codec.decode(np.asarray(batch["ar_tokens"])), truth["image_embedding"]).mean()
    baseline = _cos(truth["text_embedding"], truth["image_embedding"]).mean()
    got = _cos(z, truth["image_embedding"]).mean()
    assert got > 0.9 * ceiling and got > baseline + 0.5, (got, ceiling, baseline)


def test_dot_token_from_top_half_and_guidance(trained):
    model, params, batch, codec, _, ts = trained
    tokens = np.asarray(sample_ar_prior(model, params, batch, jax.random.PRNGKey(4),
                                        dot_top_half=True, guidance_scale=1.5, top_k=3,
                                        text_scale=ts))
    assert (tokens[:, 0] >= BUCKETS // 2).all()
    assert tokens.min() >= 0 and tokens.max() < BUCKETS
    unrestricted = np.asarray(sample_ar_prior(model, params, batch, jax.random.PRNGKey(4),
                                              dot_top_half=False, text_scale=ts))
    assert (unrestricted[:, 0] < BUCKETS // 2).any()  # the restriction is what moved them
