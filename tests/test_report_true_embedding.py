"""The report's no-prior rows: renders matching each prompt -> true z_i -> decoder -> pixel check."""
import ml_collections
import numpy as np

from unclip_jax.pipeline import SampleSettings
from unclip_jax.pipeline_train import evaluate_true_embeddings


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


def test_true_embedding_rows_find_every_prompt():
    prompts = ["a red circle", "a blue square", "an orange triangle", "a small green circle",
               "a red square and a blue circle", "a purple triangle"]
    pipe = EchoPipe()
    acc, ref, images = evaluate_true_embeddings(pipe, prompts, 3, 7, SampleSettings(), batch=4)
    singles = [p for p in prompts if " and " not in p]
    assert pipe.prompts == [p for p in singles for _ in range(3)]   # two-object prompt skipped
    assert pipe.seeds == [7, 11, 15, 19]                             # one seed per batch of 4
    assert images.shape == (15, 64, 64, 3) and images.min() >= -1 and images.max() <= 1
    for a in (acc, ref):   # 64x64 renders: the pixel check reads them exactly
        assert a["single_count"] == 15
        assert a["colour_acc"] == 1.0 and a["shape_acc"] == 1.0
    # Scenes vary as in the data (background, size, position), reproducibly for a seed.
    assert len({im.tobytes() for im in images[:3]}) == 3
    again = evaluate_true_embeddings(EchoPipe(), prompts, 3, 7, SampleSettings(), batch=4)[2]
    np.testing.assert_array_equal(again, images)


def test_true_embedding_rows_resize_like_the_data():
    """Renders reach CLIP (and the reference row) at the stages' sizes, resized from the
    dataset's 64x64 as the training data is."""
    from unclip_jax.data import preprocess, shapes
    pipe = EchoPipe(size=32)
    acc, ref, images = evaluate_true_embeddings(pipe, ["a blue square"], 2, 3, SampleSettings())
    assert images.shape == (2, 32, 32, 3)
    rng = np.random.default_rng([3, 0])
    want = preprocess.normalize(preprocess.resize_center_crop(
        shapes.render(shapes.single_object_scene(rng, "blue", "square"), 64), 32))
    np.testing.assert_array_equal(images[0], want)
    assert acc["colour_acc"] == ref["colour_acc"] == 1.0


def test_true_embedding_rows_need_single_object_prompts():
    acc, ref, images = evaluate_true_embeddings(EchoPipe(), ["a red circle and a blue square"], 2,
                                                0, SampleSettings())
    assert acc is None and ref is None and len(images) == 0
