"""Prior metrics (cosines vs the z_t baseline, sampler adapters) and the shapes caption-accuracy
evaluator on the dataset's own images."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion
from unclip_jax.data import shapes
from unclip_jax.eval import prior_metrics as PM
from unclip_jax.eval.shapes_accuracy import shapes_accuracy
from unclip_jax.models.ar_prior import ARPrior, fit_codec, sample_ar_prior
from unclip_jax.models.prior import DiffusionPrior, EmbeddingScaling, sample_prior
from unclip_jax.stages.diffusion_prior import synthetic_pairs

DIM, CTX, N = 16, 8, 12


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batches(data, size):
    return [{k: v[s:s + size] for k, v in data.items()} for s in range(0, N, size)]


def test_prior_cosines_and_evaluate_prior_match_numpy():
    rng = np.random.default_rng(0)
    z_i, z_t = _unit(rng.standard_normal((N, DIM))), _unit(rng.standard_normal((N, DIM)))
    noise = rng.standard_normal((N, DIM)) * 0.3
    data = {"image_embedding": z_i, "text_embedding": z_t, "noise": noise}
    calls = []

    def sample_fn(batch, key):
        calls.append(np.asarray(key))
        return batch["image_embedding"] * 2.0 + batch["noise"]  # scale must not matter

    r = PM.evaluate_prior(sample_fn, _batches(data, 5))
    s = z_i * 2 + noise
    cos_s = (s * z_i).sum(1) / np.linalg.norm(s, axis=1)
    cos_t = (z_t * z_i).sum(1)
    assert r["n"] == N
    np.testing.assert_allclose(r["cos_sample_true"], cos_s.mean(), rtol=1e-12)
    np.testing.assert_allclose(r["cos_text_true"], cos_t.mean(), rtol=1e-12)
    np.testing.assert_allclose(r["cos_sample_true_sem"], cos_s.std(ddof=1) / np.sqrt(N))
    assert r["gain"] == pytest.approx(cos_s.mean() - cos_t.mean())
    assert len(calls) == 3 and not np.array_equal(calls[0], calls[1])  # a fresh key per batch
    assert PM.evaluate_prior(sample_fn, _batches(data, 5), max_examples=7)["n"] == 7
    table = PM.prior_table({"diffusion": r, "ar": r})
    assert "| diffusion | 12 |" in table and f"{r['cos_text_true']:.4f}" in table
    with pytest.raises(KeyError, match="image_embedding"):
        PM.evaluate_prior(sample_fn, [{"text_embedding": z_t}])


def test_prior_sampler_adapters_call_our_priors():
    """evaluate_prior with each adapter equals sampling the batch directly with the same key
    (untrained tiny priors: this checks the plumbing, not quality; one batch keeps it fast,
    batching is checked above)."""
    data = synthetic_pairs(N, DIM, CTX, 64, seed=0)
    batches = _batches(data, N)
    dev = lambda b: {k: jnp.asarray(v) for k, v in b.items()}  # noqa: E731
    keys = [jax.random.fold_in(jax.random.PRNGKey(3), 0)]

    def expected(sample):
        z = np.concatenate([np.asarray(sample(dev(b), k)) for b, k in zip(batches, keys)])
        return PM.prior_cosines(z, data["image_embedding"], data["text_embedding"])

    model = DiffusionPrior(DIM, width=32, depth=1, heads=2, text_ctx=CTX, vocab_size=64)
    b0 = dev(batches[0])
    cond = {"z_t": b0["text_embedding"], "tokens": b0["tokens"], "token_mask": b0["token_mask"],
            "drop": jnp.zeros((N,), bool)}  # "drop" makes init create the null parameters
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((N, DIM)),
                                      jnp.zeros((N,), jnp.int32), cond))["params"]
    kw = dict(schedule=diffusion.make_schedule("cosine", 1000),
              scaling=EmbeddingScaling.fixed(4.0), steps="4", num_candidates=2)
    got = PM.evaluate_prior(PM.diffusion_prior_sampler(model, params, **kw), batches, seed=3)
    want = expected(lambda b, k: sample_prior(model, params, b, k, **kw))
    assert got == pytest.approx(want, rel=1e-5)

    codec = fit_codec(data["image_embedding"], data["text_embedding"], k=6, num_buckets=8)
    ar = ARPrior(num_buckets=8, num_tokens=7, text_ctx=CTX, vocab_size=64, enc_width=32,
                 enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)
    ar_params = nn.meta.unbox(jax.jit(ar.init)(jax.random.PRNGKey(1), jnp.zeros((N, 7), jnp.int32),
                                      cond))["params"]
    got = PM.evaluate_prior(PM.ar_prior_sampler(ar, ar_params, codec, temperature=1.0), batches,
                            seed=3)
    want = expected(lambda b, k: codec.decode(np.asarray(
        sample_ar_prior(ar, ar_params, b, k, temperature=1.0))))
    assert got == pytest.approx(want, rel=1e-5)
    assert got["n"] == N and -1 <= got["cos_sample_true"] <= 1


def _dataset(size, n=200):
    ex = [shapes.example(0, 1, i, size) for i in range(n)]
    return np.stack([e[2] for e in ex]), [e[1] for e in ex], [e[0] for e in ex]


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_accuracy_on_the_datasets_own_images(size):
    images, captions, _ = _dataset(size)
    r = shapes_accuracy(images, captions)
    assert r["single_count"] > 50 and r["two_count"] > 50 and r["unparsed_count"] == 0
    for k in ("colour_acc", "shape_acc", "both_acc", "binding_acc", "object_acc"):
        assert r[k] >= 0.98, (k, r)
    # [-1, 1] float images are read the same way
    r_float = shapes_accuracy(images.astype(np.float32) / 127.5 - 1.0, captions)
    assert r_float["both_acc"] == r["both_acc"] and r_float["binding_acc"] == r["binding_acc"]


def test_shapes_accuracy_on_mismatched_prompts_is_low():
    images, captions, _ = _dataset(32)
    perm = np.random.default_rng(0).permutation(len(captions))
    r = shapes_accuracy(images, [captions[i] for i in perm])
    assert r["colour_acc"] < 0.35 and r["both_acc"] < 0.2 and r["binding_acc"] < 0.1, r


def test_binding_needs_the_right_colour_shape_pairing():
    """Two-object prompts with the colours swapped between the shapes: every colour and shape
    is in the image, but the pairing is wrong, so binding must fail."""
    images, _, scenes = _dataset(64)
    two = [i for i, s in enumerate(scenes)
           if len(s["objects"]) == 2 and s["objects"][0]["colour"] != s["objects"][1]["colour"]
           and s["objects"][0]["shape"] != s["objects"][1]["shape"]]
    assert len(two) > 30

    def art(w):
        return "an" if w[0] in "aeiou" else "a"

    swapped, right = [], []
    for i in two:
        a, b = scenes[i]["objects"]
        swapped.append(f"{art(b['colour'])} {b['colour']} {a['shape']} and "
                       f"{art(a['colour'])} {a['colour']} {b['shape']}")
        right.append(f"{art(a['colour'])} {a['colour']} {a['shape']} and "
                     f"{art(b['colour'])} {b['colour']} {b['shape']}")
    assert shapes_accuracy(images[two], right)["binding_acc"] >= 0.98
    r = shapes_accuracy(images[two], swapped)
    assert r["binding_count"] == 0 and r["two_count"] == len(two)


def test_shape_confusion_counts_asked_against_read():
    """Single-object images under captions naming another shape: each sample is counted under
    (shape asked for, shape in the image), a blank image under "none"; the rows sum to the
    single-object count and the diagonal to the shape hits."""
    images, _, scenes = _dataset(32)
    single = [i for i, s in enumerate(scenes) if len(s["objects"]) == 1]
    nxt = {"circle": "square", "square": "triangle", "triangle": "circle"}
    prompts = [f"a red {nxt[scenes[i]['objects'][0]['shape']]}" for i in single]
    blank = np.full_like(images[0], 255)              # white background, no object
    r = shapes_accuracy(np.concatenate([images[single], blank[None]]), prompts + ["a red circle"])
    conf = r["shape_confusion"]
    for asked in shapes.SHAPES:
        truth = [scenes[i]["objects"][0]["shape"] for i, p in zip(single, prompts)
                 if p.endswith(asked)]
        want = {read: truth.count(read) for read in shapes.SHAPES}
        want["none"] = 1 if asked == "circle" else 0
        assert conf[asked] == want, (asked, conf[asked], want)
    assert sum(sum(row.values()) for row in conf.values()) == r["single_count"] == len(single) + 1
    assert sum(conf[s][s] for s in shapes.SHAPES) == r["shape_count"] == 0
