"""Prior metrics (cosines vs the z_t baseline, sampled through the shared eval.sampling), the
shared prompt check, and the shapes caption-accuracy evaluator on the dataset's own images."""
import re

import numpy as np
import pytest

from unclip_jax.data import shapes
from unclip_jax.eval import prior_metrics as PM
from unclip_jax.eval.shapes_accuracy import shapes_accuracy

DIM, N = 16, 12


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class PriorPipe:
    """Pipeline.sample_prior stand-in: z_i = the caption's row of a table (so results can be
    checked against their captions), scaled per prior; records every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def sample_prior(self, prompts, *, seed, settings):
        self.calls.append((len(prompts), seed, settings.prior))
        return self.table[[int(p) for p in prompts]] * (2.0 if settings.prior == "ar" else 3.0)


def test_prior_comparison_matches_numpy():
    from unclip_jax.eval.sampling import PRIOR_SEED_OFFSET, prior_comparison
    from unclip_jax.inference import SampleSettings
    rng = np.random.default_rng(0)
    z_i, z_t = _unit(rng.standard_normal((N, DIM))), _unit(rng.standard_normal((N, DIM)))
    noise = rng.standard_normal((N, DIM)) * 0.3
    pipe = PriorPipe(z_i + noise)
    r = prior_comparison(pipe, [str(i) for i in range(N)], z_i, z_t, seed=7,
                         settings=SampleSettings(), priors=("diffusion", "ar"), batch_size=5)
    s = z_i + noise
    cos_s = (s * z_i).sum(1) / np.linalg.norm(s, axis=1)   # the scale must not matter
    cos_t = (z_t * z_i).sum(1)
    assert set(r) == {"diffusion", "ar"}
    for name in r:
        assert r[name]["n"] == N
        np.testing.assert_allclose(r[name]["cos_sample_true"], cos_s.mean(), rtol=1e-12)
        np.testing.assert_allclose(r[name]["cos_text_true"], cos_t.mean(), rtol=1e-12)
        np.testing.assert_allclose(r[name]["cos_sample_true_sem"],
                                   cos_s.std(ddof=1) / np.sqrt(N))
        assert r[name]["gain"] == pytest.approx(cos_s.mean() - cos_t.mean())
    # Batches of 5 (the last padded to 5), seeded by their first row, each prior its own seeds.
    off = PRIOR_SEED_OFFSET
    assert pipe.calls == [(5, 7 + i + off[p], p) for i in (0, 5, 10) for p in ("diffusion", "ar")]
    assert PM.compare_priors({"x": s}, z_i, z_t)["x"] == pytest.approx(r["diffusion"], rel=1e-12)
    table = PM.prior_table(r)
    assert "| diffusion | 12 |" in table and f"{r['ar']['cos_text_true']:.4f}" in table
    with pytest.raises(ValueError, match="paired embeddings"):
        PM.prior_cosines(s[:3], z_i, z_t)


class RenderPipe:
    """Pipeline.text_to_image stand-in that draws each single-object prompt's scene (so the
    pixel check must read every one right), records the calls."""

    def __init__(self):
        self.calls = []

    def text_to_image(self, prompts, *, seed, settings):
        from unclip_jax.data import preprocess, shapes_eval
        self.calls.append((len(prompts), seed))
        rng = np.random.default_rng(seed)
        return {"images": np.stack([preprocess.normalize(shapes.render(
            shapes.single_object_scene(rng, *shapes_eval.parse_single(p)), 64))
            for p in prompts])}


def test_check_prompts_batches_seeds_and_reads_the_pixels():
    from unclip_jax.eval.sampling import check_prompts
    from unclip_jax.inference import SampleSettings
    prompts = [p for p in ("a red circle", "a blue square", "a green triangle") for _ in range(3)]
    pipe = RenderPipe()
    acc, images = check_prompts(pipe, prompts, seed=4, settings=SampleSettings(), batch_size=4)
    assert pipe.calls == [(4, 4), (4, 8), (4, 12)]   # the last batch padded to 4
    assert images.shape == (9, 64, 64, 3) and images.dtype == np.uint8
    assert acc["single_count"] == 9 and acc["colour_acc"] == 1.0 and acc["shape_acc"] == 1.0
    for k, v in shapes_accuracy(images, prompts).items():   # merging the batches loses nothing
        np.testing.assert_equal(acc[k], v)


def _dataset(size, n=200):
    ex = [shapes.example(0, 1, i, size) for i in range(n)]
    return np.stack([e[2] for e in ex]), [e[1] for e in ex], [e[0] for e in ex]


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_accuracy_on_the_datasets_own_images(size):
    images, captions, _ = _dataset(size)
    r = shapes_accuracy(images, captions)
    assert r["single_count"] > 50 and r["two_count"] > 50 and r["unparsed_count"] == 0
    assert r["positions_named_count"] > 30 and r["relations_named_count"] > 20, r
    for k in ("colour_acc", "shape_acc", "both_acc", "shape_fill_acc", "binding_acc",
              "object_acc", "position_acc", "relation_acc"):
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


def test_position_and_relation_words_that_do_not_hold_score_zero():
    """The dataset's captions with every position word and relation turned to its opposite
    (left <-> right, top <-> bottom, above <-> below, ...): none is honoured; the centre, which
    has no opposite, is left out."""
    images, captions, _ = _dataset(64)
    flip = {"on the left": "on the right", "on the right": "on the left", "at the top":
            "at the bottom", "at the bottom": "at the top", "above": "below", "below": "above",
            "to the left of": "to the right of", "to the right of": "to the left of"}
    pattern = re.compile("|".join(sorted(map(re.escape, flip), key=len, reverse=True)))
    keep = [i for i, c in enumerate(captions) if pattern.search(c)
            and not re.search("centre|middle", c)]
    flipped = [pattern.sub(lambda m: flip[m.group(0)], captions[i]) for i in keep]
    right = shapes_accuracy(images[keep], [captions[i] for i in keep])
    r = shapes_accuracy(images[keep], flipped)
    assert r["positions_named_count"] > 20 and r["relations_named_count"] > 20, r
    assert right["position_acc"] == right["relation_acc"] == 1.0, right
    assert r["positions_right_count"] == r["relations_right_count"] == 0, r


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
        want["blob"] = 0
        assert conf[asked] == want, (asked, conf[asked], want)
    assert sum(sum(row.values()) for row in conf.values()) == r["single_count"] == len(single) + 1
    assert sum(conf[s][s] for s in shapes.SHAPES) == r["shape_count"] == 0
