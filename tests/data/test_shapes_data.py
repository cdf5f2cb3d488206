"""The built-in shapes dataset: captions true from pixels, determinism, the pixel classifier."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data import default_data_config, make_iterator, preprocess, shapes
from unclip_jax.data import shapes_eval, shapes_tfds

NUM_TRAIN, NUM_TEST = 96, 32


def tiny_config(data_dir, seed=0):
    c = default_data_config("shapes")
    c.data_dir = str(data_dir)
    c.shapes.num_train, c.shapes.num_test, c.shapes.seed = NUM_TRAIN, NUM_TEST, seed
    c.num_threads = 2
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    shapes_tfds.builder(NUM_TRAIN, NUM_TEST, 0, 64, data_dir=str(d))
    return d


def _raw_records(data_dir, seed, split):
    b = shapes_tfds.builder(NUM_TRAIN, NUM_TEST, seed, 64, data_dir=str(data_dir))
    src = b.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


def test_every_caption_is_true_of_its_pixels(data_dir):
    it = make_iterator(tiny_config(data_dir), split="train", process_index=0, process_count=1,
                       local_batch_size=NUM_TRAIN, seed=0, num_epochs=1, shuffle=False)
    batch = next(it)
    assert batch["image"].shape == (NUM_TRAIN, 64, 64, 3) and batch["image"].dtype == np.float32
    for image, text in zip(preprocess.denormalize(batch["image"]), batch["caption"]):
        assert shapes_eval.caption_errors(image, text) == [], text


def test_caption_checker_rejects_false_captions():
    # The check above could not pass by accident: wrong colour, shape or background are caught.
    rng = np.random.default_rng(0)
    caught = 0
    for i in range(60):
        scene, text, image = shapes.example(7, 0, i)
        obj = scene["objects"][0]
        other_colour = [c for c in shapes.COLOUR_NAMES if c != obj["colour"]][rng.integers(5)]
        other_shape = [s for s in shapes.SHAPES if s != obj["shape"]][rng.integers(2)]
        other_bg = [b for b in shapes.BACKGROUND_NAMES if b != scene["background"]][0]
        false = [f"a {other_colour} {obj['shape']}", f"a {obj['colour']} {other_shape}",
                 f"a {obj['colour']} {obj['shape']} on a {other_bg} background"]
        if len(scene["objects"]) == 1:
            caught += sum(bool(shapes_eval.caption_errors(image, f)) for f in false)
        else:
            caught += 3 * bool(shapes_eval.caption_errors(image, false[0]))
    assert caught == 180


def test_stored_attributes_match_pixels(data_dir):
    it = make_iterator(tiny_config(data_dir), split="test", process_index=0, process_count=1,
                       local_batch_size=NUM_TEST, seed=0, num_epochs=1)
    b = next(it)
    for k in range(NUM_TEST):
        seen = shapes_eval.analyse(preprocess.denormalize(b["image"][k]))
        assert shapes.BACKGROUND_NAMES[b["background"][k]] == seen["background"]
        assert b["num_objects"][k] == len(seen["objects"])
        stored = {(shapes.COLOUR_NAMES[c], shapes.SHAPES[s], shapes.SIZES[z])
                  for c, s, z in zip(b["obj_colour"][k], b["obj_shape"][k], b["obj_size"][k])
                  if c >= 0}
        assert stored == {(o["colour"], o["shape"], o["size"]) for o in seen["objects"]}


def test_same_seed_gives_identical_records_and_other_seed_differs(data_dir, tmp_path):
    again = _raw_records(tmp_path / "again", 0, "train")
    first = _raw_records(data_dir, 0, "train")
    assert len(first) == NUM_TRAIN
    for a, b in zip(first, again):
        assert a["image"] == b["image"] and a["caption"] == b["caption"] and a["id"] == b["id"]
    other = _raw_records(tmp_path / "other", 1, "train")
    assert sum(a["image"] != b["image"] for a, b in zip(first, other)) > NUM_TRAIN // 2


def test_train_and_test_splits_differ(data_dir):
    train = {r["image"] for r in _raw_records(data_dir, 0, "train")}
    test = [r["image"] for r in _raw_records(data_dir, 0, "test")]
    assert len(test) == NUM_TEST and sum(t in train for t in test) < 3  # collisions are rare


def test_render_is_antialiased_with_exact_palette():
    scene = {"background": "black",
             "objects": [{"shape": "square", "colour": "red", "size": "large",
                          "position": "centre"}]}
    img = shapes.render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[32, 32]) == shapes.COLOURS["red"]
    assert tuple(img[0, 0]) == shapes.BACKGROUNDS["black"]
    circle = shapes.render({**scene, "objects": [{**scene["objects"][0], "shape": "circle"}]})
    # Antialiasing: the circle's rim has colours strictly between background and red.
    rim = circle.reshape(-1, 3)[:, 0]
    assert ((rim > 15) & (rim < 220)).sum() > 20


def test_two_objects_never_overlap():
    for i in range(500):
        scene = shapes.sample_scene(np.random.default_rng(i))
        if len(scene["objects"]) == 2:
            a, b = scene["objects"]
            reach = shapes.HALF_EXTENT[a["size"]] + shapes.HALF_EXTENT[b["size"]]
            assert abs(a["x"] - b["x"]) > reach or abs(a["y"] - b["y"]) > reach


def test_objects_have_their_nominal_size_and_stay_inside():
    """A square's rendered side is 2 * HALF_EXTENT of the image side (the size the 32x32 decoder
    is sized for), every object lies inside the image, and two-object scenes stay common."""
    for size in shapes.SIZES:
        for px in (32, 64):
            img = shapes.render({"background": "black", "objects": [
                {"shape": "square", "colour": "red", "size": size, "position": "centre"}]}, px)
            cols = np.nonzero((img[..., 0] > 117).any(axis=0))[0]   # over half red
            assert abs(len(cols) - 2 * shapes.HALF_EXTENT[size] * px) <= 1.0, (size, px)
            # The main job's decoder draws shapes right from about 10 px (README).
            assert len(cols) >= 10 * px // 32, (size, px)
    scenes = [shapes.sample_scene(np.random.default_rng(i)) for i in range(400)]
    for sc in scenes:
        for o in sc["objects"]:
            r = shapes.HALF_EXTENT[o["size"]]
            assert r <= o["x"] <= 1 - r and r <= o["y"] <= 1 - r
    two = [sc for sc in scenes if len(sc["objects"]) == 2]
    assert 0.4 < len(two) / len(scenes) < 0.6
    assert any("large" in {o["size"] for o in sc["objects"]} for sc in two)


def test_single_object_scene_fixes_colour_and_shape_only():
    rng = np.random.default_rng(0)
    scenes = [shapes.single_object_scene(rng, "orange", "triangle") for _ in range(200)]
    assert all(len(s["objects"]) == 1 for s in scenes)
    objs = [s["objects"][0] for s in scenes]
    assert {(o["colour"], o["shape"]) for o in objs} == {("orange", "triangle")}
    # The rest is drawn as in sample_scene: every background, size and position occurs.
    assert {s["background"] for s in scenes} == set(shapes.BACKGROUND_NAMES)
    assert {o["size"] for o in objs} == set(shapes.SIZES)
    assert {o["position"] for o in objs} == set(shapes.POSITIONS)
    got = shapes_eval.classify(shapes.render(scenes[0]))
    assert (got["colour"], got["shape"]) == ("orange", "triangle")
    with pytest.raises(ValueError, match="unknown colour/shape"):
        shapes.single_object_scene(rng, "pink", "circle")


@pytest.mark.parametrize("size", [64, 32])
def test_classifier_accuracy_on_single_objects(size):
    right = total = 0
    for i in range(300):
        scene, text, image = shapes.example(3, 0, i)
        if len(scene["objects"]) != 1:
            continue
        if size != 64:
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.BOX))
        got = shapes_eval.classify(image)
        colour, shape = shapes_eval.parse_single(text)
        total += 1
        right += (got["colour"], got["shape"], got["background"]) == (
            colour, shape, scene["background"])
    assert total > 100 and right / total >= 0.97


def test_classifier_takes_normalised_floats():
    scene, _, image = shapes.example(0, 0, 1)
    assert shapes_eval.classify(preprocess.normalize(image)) == shapes_eval.classify(image)


def test_parse_caption():
    p = shapes_eval.parse_caption("a large blue square on the left on a gray background")
    assert p == {"objects": [{"colour": "blue", "shape": "square", "size": "large",
                              "position": "left"}], "relation": None, "background": "gray"}
    p = shapes_eval.parse_caption("a green circle above an orange triangle")
    assert [o["colour"] for o in p["objects"]] == ["green", "orange"] and p["relation"] == "above"
    assert shapes_eval.parse_single("a small yellow triangle on a black background") == (
        "yellow", "triangle")
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes_eval.parse_caption("a photo of a dog")
    with pytest.raises(ValueError, match="one-object"):
        shapes_eval.parse_single("a red square and a blue circle")


def test_captions_are_varied():
    texts = [shapes.example(0, 0, i)[1] for i in range(400)]
    assert len(set(texts)) > 300
    for word in ("small", "large", "on the left", "background", " and ", "above"):
        assert any(word in t for t in texts), word


def test_data_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("UNCLIP_DATA_DIR", str(tmp_path))
    assert shapes_tfds.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("UNCLIP_DATA_DIR")
    assert shapes_tfds.default_data_dir().endswith("unclip_jax/tfds")


def test_two_processes_share_shapes_data_on_gcs():
    """Two processes (jax.distributed) open the shapes data at a gs:// data_dir: process 0
    generates and uploads it once (its .complete marker last), process 1 waits and builds
    nothing, and both read the same records, those of `shapes.example`."""
    from helpers.gcs import emulator
    from helpers.processes import run_workers

    from unclip_jax import distributed, paths
    with emulator() as bucket:
        data_dir = f"{bucket}/tfds"
        runs = run_workers(2, 1, data_dir, MP_TASK="shapes_gcs")
        url = f"{data_dir}/unclip_shapes/n3_2_s0_r16/{shapes_tfds.UnclipShapes.VERSION}"
        assert distributed.written(url)
        listed = paths.glob(f"{url}/*")
    assert [(r["process"], r["generated"], r["uploads"]) for r in runs] == [(0, 2, 1), (1, 0, 0)]
    assert any(p.endswith(".array_record-00000-of-00001") for p in listed)
    for split, n in (("train", 3), ("test", 2)):
        assert runs[0][split] == runs[1][split]
        assert sorted(runs[0][split]["captions"]) == sorted(   # tfds stores them shuffled
            shapes.example(0, shapes.SPLIT_IDS[split], i, 16)[1] for i in range(n))
