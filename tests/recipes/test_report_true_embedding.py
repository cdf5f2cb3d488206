"""The report's no-prior rows: renders matching each prompt -> true z_i -> decoder -> pixel check."""
import ml_collections
import numpy as np

from unclip_jax.inference import SampleSettings
from unclip_jax.recipes.shapes import evaluate_true_embeddings


class _Stage:
    def __init__(self, size):
        self.config = ml_collections.ConfigDict({"model": {"image_size": size}})


class EchoPipe:
    """A pipeline whose decoder returns exactly the image each z_i was encoded from, so the check
    must find every prompt's colour and shape; a misaligned prompt, scene or batch would not."""

    def __init__(self, size=64):
        self.clip, self.decoder, self.upsamplers = _Stage(size), _Stage(size), []
        self.images, self.prompts, self.seeds = [], [], []

    def encode_images(self, images):
        first = len(self.images)
        self.images.extend(np.asarray(images))
        return np.arange(first, first + len(images), dtype=np.float32)[:, None]

    def decode(self, z, *, prompts, seed, settings):
        self.prompts.extend(prompts)
        self.seeds.append(seed)
        return np.stack([self.images[int(i)] for i in z[:, 0]])

    def upsample(self, images, *, seed, settings):
        return images


class EchoUpsamplePipe(EchoPipe):
    """EchoPipe with a decoder at half the output size and one 2x nearest-neighbour upsampler
    that records what it is given."""

    def __init__(self):
        super().__init__(size=32)
        self.upsamplers = [_Stage(64)]
        self.upsampled = []

    def upsample(self, images, *, seed, settings):
        self.upsampled.append(np.asarray(images))
        return np.repeat(np.repeat(np.asarray(images), 2, axis=1), 2, axis=2)


def _diagonal(prompts, per_prompt):
    """Confusion counts of a check that reads every single-object prompt's shape right."""
    shapes_ = ("circle", "square", "triangle")
    conf = {s: {x: 0 for x in shapes_ + ("blob", "none")} for s in shapes_}
    for p in prompts:
        conf[p.split()[-1]][p.split()[-1]] += per_prompt
    return conf


def test_true_embedding_rows_find_every_prompt():
    prompts = ["a red circle", "a blue square", "an orange triangle", "a small green circle",
               "a red square and a blue circle", "a purple triangle"]
    pipe = EchoPipe()
    r = evaluate_true_embeddings(pipe, prompts, 3, 7, SampleSettings(), batch=4)
    acc, ref, images = r["decoded"], r["rendered"], r["images"]
    assert r["upsampled_render"] is None   # no upsamplers: no upsampler-only row
    singles = [p for p in prompts if " and " not in p]
    assert pipe.prompts == [p for p in singles for _ in range(3)]   # two-object prompt skipped
    assert pipe.seeds == [7, 11, 15, 19]                             # one seed per batch of 4
    assert images.shape == (15, 64, 64, 3) and images.min() >= -1 and images.max() <= 1
    for a in (acc, ref):   # 64x64 renders: the pixel check reads them exactly
        assert a["single_count"] == 15
        assert a["colour_acc"] == 1.0 and a["shape_acc"] == 1.0
        assert a["shape_confusion"] == _diagonal(singles, 3)
    # Scenes vary as in the data (background, size, position), reproducibly for a seed.
    assert len({im.tobytes() for im in images[:3]}) == 3
    again = evaluate_true_embeddings(EchoPipe(), prompts, 3, 7, SampleSettings(), batch=4)["images"]
    np.testing.assert_array_equal(again, images)


def test_true_embedding_rows_resize_like_the_data():
    """Renders reach CLIP (and the reference row) at the stages' sizes, resized from the
    dataset's 64x64 as the training data is."""
    from unclip_jax.data import preprocess, shapes
    pipe = EchoPipe(size=32)
    r = evaluate_true_embeddings(pipe, ["a blue square"], 2, 3, SampleSettings())
    acc, ref, images = r["decoded"], r["rendered"], r["images"]
    assert images.shape == (2, 32, 32, 3)
    rng = np.random.default_rng([3, 0])
    want = preprocess.normalize(preprocess.resize_center_crop(
        shapes.render(shapes.single_object_scene(rng, "blue", "square"), 64), 32))
    np.testing.assert_array_equal(images[0], want)
    assert acc["colour_acc"] == ref["colour_acc"] == 1.0


def test_true_embedding_rows_need_single_object_prompts():
    r = evaluate_true_embeddings(EchoPipe(), ["a red circle and a blue square"], 2, 0,
                                 SampleSettings())
    assert r["decoded"] is None and r["rendered"] is None and r["upsampled_render"] is None
    assert len(r["images"]) == 0


def test_upsampler_only_row_upsamples_the_renders_at_the_decoders_size():
    """The upsampler-only row feeds the renders, resized to the decoder's size like the data,
    to the upsamplers (one call per batch, after the decoded batch) and checks the result."""
    from unclip_jax.data import preprocess, shapes
    pipe = EchoUpsamplePipe()
    prompts = ["a red circle", "a blue square", "an orange triangle"]
    r = evaluate_true_embeddings(pipe, prompts, 2, 5, SampleSettings(), batch=4)
    assert r["images"].shape == (6, 64, 64, 3)
    # Calls alternate: decoded batch, then the renders of that batch: (4, 4), (2, 2) images.
    assert [len(u) for u in pipe.upsampled] == [4, 4, 2, 2]
    low = np.concatenate(pipe.upsampled[1::2])
    want = []
    for i, p in enumerate(prompts):
        rng = np.random.default_rng([5, i])
        colour, shape = p.split()[-2:]
        for _ in range(2):
            want.append(preprocess.normalize(preprocess.resize_center_crop(
                shapes.render(shapes.single_object_scene(rng, colour, shape), 64), 32)))
    np.testing.assert_array_equal(low, np.stack(want))
    up = r["upsampled_render"]
    assert up["single_count"] == 6 and up["colour_acc"] == 1.0 and up["shape_acc"] == 1.0
    assert up["shape_confusion"] == _diagonal(prompts, 2)
