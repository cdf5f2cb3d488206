"""Readers (shapes, tfds, webdataset tar shards, image folders): batches, resume, splits, skips."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import default_data_config, make_iterator, preprocess, shapes_tfds

NUM_TRAIN, NUM_TEST = 64, 16


@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    c = default_data_config("shapes")
    c.data_dir = str(d)
    c.shapes.num_train, c.shapes.num_test = NUM_TRAIN, NUM_TEST
    c.num_threads = 2
    return c


def _png(colour, size=(40, 30), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _colour(i):
    return (i * 7 % 256, i * 13 % 256, i * 29 % 256)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ shapes
def test_shapes_batch_layout(shapes_config):
    it = make_iterator(shapes_config, split="train", process_index=0, process_count=1,
                       local_batch_size=8, seed=0)
    b = next(it)
    assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() < 0 < b["image"].max() <= 1.0
    assert b["caption"].dtype == object and isinstance(b["caption"][0], str)
    assert b["obj_shape"].shape == (8, 2) and b["index"].dtype == np.int64
    assert set(b["num_objects"]) <= {1, 2}
    # Second object slots are -1 exactly where there is one object.
    assert np.array_equal(b["obj_colour"][:, 1] < 0, b["num_objects"] == 1)


def test_shapes_lower_resolution_and_field_selection(shapes_config):
    c = shapes_config.copy_and_resolve_references()
    c.resolution = 32
    it = make_iterator(c, split="test", process_index=0, process_count=1, local_batch_size=4,
                       seed=0, fields=("image", "caption"))
    b = next(it)
    assert set(b) == {"image", "caption"} and b["image"].shape == (4, 32, 32, 3)
    it = make_iterator(c, split="test", process_index=0, process_count=1, local_batch_size=4,
                       seed=0, fields=("caption", "background"))
    assert set(next(it)) == {"caption", "background"}
    with pytest.raises(ValueError, match="not provided"):
        make_iterator(c, split="test", process_index=0, process_count=1, local_batch_size=4,
                      seed=0, fields=("image", "tokens"))


def test_shapes_resume_gives_same_next_batch(shapes_config):
    kw = dict(split="train", process_index=0, process_count=1, local_batch_size=24, seed=5)
    it = make_iterator(shapes_config, **kw)
    _take(it, 4)  # crosses an epoch boundary (64 examples)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)
    fresh = make_iterator(shapes_config, **kw)
    fresh.set_state(state)
    for a, b in zip(expected, _take(fresh, 3)):
        assert _same(a, b)


def test_shuffling_is_per_seed_and_epoch(shapes_config):
    def order(seed, n=2):
        it = make_iterator(shapes_config, split="train", process_index=0, process_count=1,
                           local_batch_size=NUM_TRAIN, seed=seed, fields=("index",))
        return [next(it)["index"] for _ in range(n)]

    e0, e1 = order(0)
    assert sorted(e0) == sorted(e1) == list(range(NUM_TRAIN))  # each epoch is a permutation
    assert not np.array_equal(e0, e1)                          # reshuffled per epoch
    assert np.array_equal(order(0)[0], e0)                     # deterministic
    assert not np.array_equal(order(1)[0], e0)                 # depends on the seed
    it = make_iterator(shapes_config, split="test", process_index=0, process_count=1,
                       local_batch_size=NUM_TEST, seed=0, fields=("index",))
    assert list(next(it)["index"]) == list(range(NUM_TEST))    # eval splits keep order


def test_processes_read_disjoint_examples(shapes_config):
    seen = []
    for p in range(3):
        it = make_iterator(shapes_config, split="train", process_index=p, process_count=3,
                           local_batch_size=5, seed=0, num_epochs=1, fields=("index",))
        seen.append(np.concatenate([b["index"] for b in it]))
    assert sum(len(s) for s in seen) == NUM_TRAIN
    assert sorted(np.concatenate(seen)) == list(range(NUM_TRAIN))


def test_finite_epoch_keeps_partial_last_batch(shapes_config):
    it = make_iterator(shapes_config, split="test", process_index=0, process_count=1,
                       local_batch_size=6, seed=0, num_epochs=1, fields=("index",))
    assert [len(b["index"]) for b in it] == [6, 6, 4]


# -------------------------------------------------------------------------------------- tfds
def test_tfds_reader_on_shapes_dataset(shapes_config):
    shapes_tfds.builder(NUM_TRAIN, NUM_TEST, 0, 64, data_dir=shapes_config.data_dir)
    c = default_data_config("tfds")
    c.tfds_name = f"unclip_shapes/{shapes_tfds.config_for(NUM_TRAIN, NUM_TEST, 0, 64).name}"
    c.data_dir, c.num_threads = shapes_config.data_dir, 0
    b = next(make_iterator(c, split="test", process_index=0, process_count=1,
                           local_batch_size=NUM_TEST, seed=0))
    ref = next(make_iterator(shapes_config, split="test", process_index=0, process_count=1,
                             local_batch_size=NUM_TEST, seed=0))
    assert set(b) == {"image", "caption", "index"}
    for k in b:
        assert np.array_equal(b[k], ref[k])
    c.caption_key = "label"
    with pytest.raises(KeyError, match="no feature 'label'"):
        make_iterator(c, split="test", process_index=0, process_count=1, local_batch_size=2,
                      seed=0)
    c.tfds_name = "no_such_dataset_xyz"
    with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
        make_iterator(c, split="test", process_index=0, process_count=1, local_batch_size=2,
                      seed=0)


def test_tfds_reader_on_gcs(shapes_config):
    """A prepared tfds dataset uploaded to a gs:// data_dir (the GCS emulator) reads the same
    batches as its local folder; a missing dataset or bucket is named by its URL."""
    from helpers.gcs import emulator

    from unclip_jax import paths
    b = shapes_tfds.builder(NUM_TRAIN, NUM_TEST, 0, 64, data_dir=shapes_config.data_dir)
    c = default_data_config("tfds")
    c.tfds_name = f"unclip_shapes/{b.builder_config.name}"
    c.data_dir, c.num_threads = shapes_config.data_dir, 0
    kw = dict(split="test", process_index=0, process_count=1, local_batch_size=NUM_TEST, seed=0)
    ref = next(make_iterator(c, **kw))
    with emulator() as bucket:
        rel = os.path.relpath(b.data_dir, shapes_config.data_dir)
        paths.upload(str(b.data_dir), f"{bucket}/tfds/{rel}")
        c.data_dir = f"{bucket}/tfds"
        got = next(make_iterator(c, **kw))
        assert got.keys() == ref.keys()
        for k in ref:
            assert np.array_equal(got[k], ref[k]), k
        c.tfds_name = "unclip_shapes"   # registered, but its default config is not there
        default = shapes_tfds.config_for(20_000, 2_000, 0, 64).name
        with pytest.raises(FileNotFoundError, match=f"no prepared dataset at {bucket}/tfds/"
                           f"unclip_shapes/{default}/{shapes_tfds.UnclipShapes.VERSION}"):
            make_iterator(c, **kw)
        c.tfds_name = "no_such_dataset_xyz"
        with pytest.raises(FileNotFoundError, match=f"no_such_dataset_xyz.*{bucket}/tfds"):
            make_iterator(c, **kw)
        c.data_dir = "gs://no-such-bucket/tfds"
        with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
            make_iterator(c, **kw)


# -------------------------------------------------------------------------------- webdataset
def _write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """4 shards x 5 examples; shard 1 holds a corrupt jpg, shard 2 a key with no caption."""
    for s in range(4):
        members = []
        for k in range(5):
            i = s * 5 + k
            key = f"{i:09d}"
            if (s, k) == (1, 2):
                members.append((f"{key}.jpg", b"\xff\xd8\xff\xe0 truncated jpeg"))
            else:
                fmt = ("PNG", "JPEG", "WEBP")[i % 3]
                ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
                members.append((f"{key}.{ext}", _png(_colour(i), fmt=fmt)))
            if (s, k) != (2, 3):
                members.append((f"{key}.txt", f"caption {i}".encode()))
            members.append((f"{key}.json", json.dumps({"key": key}).encode()))
        _write_shard(tmp_path / f"shard-{s:05d}.tar", members)
    c = default_data_config("webdataset")
    c.path, c.resolution, c.num_threads = str(tmp_path / "shard-*.tar"), 16, 2
    return c


def _all(c, p=0, n=1, bs=4):
    it = make_iterator(c, split="train", process_index=p, process_count=n, local_batch_size=bs,
                       seed=0, num_epochs=1, shuffle=False)
    batches = list(it)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, it.stats()


def test_webdataset_reads_and_skips_bad_examples(shards):
    out, stats = _all(shards)
    assert stats["skipped_corrupt"] == 1 and stats["skipped_no_caption"] == 1
    assert stats["examples"] == 18 == len(out["caption"])
    assert out["image"].shape == (18, 16, 16, 3)
    for cap, img in zip(out["caption"], out["image"]):
        i = int(cap.split()[1])
        assert (i // 5, i % 5) not in ((1, 2), (2, 3))
        # Solid-colour images: the decoded pixel colour identifies the example (JPEG/WebP lossy).
        assert np.abs(preprocess.denormalize(img[8, 8]).astype(int)
                      - np.array(_colour(i))).max() <= 12


def test_webdataset_shards_split_across_processes(shards):
    p0, _ = _all(shards, 0, 2)
    p1, _ = _all(shards, 1, 2)
    shard_of = lambda out: {int(c.split()[1]) // 5 for c in out["caption"]}
    assert shard_of(p0) == {0, 2} and shard_of(p1) == {1, 3}
    assert not set(p0["index"]) & set(p1["index"])


def test_webdataset_resume(shards):
    kw = dict(split="train", process_index=0, process_count=1, local_batch_size=3, seed=2)
    it = make_iterator(shards, **kw)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected, stats = _take(it, 4), it.stats()
    fresh = make_iterator(shards, **kw)
    fresh.set_state(state)
    for a, b in zip(expected, _take(fresh, 4)):
        assert _same(a, b)
    assert fresh.stats() == stats  # skip counters travel with the state


def test_webdataset_truncated_shard_keeps_what_is_whole(shards):
    # An interrupted download: shard 3 cut in the middle of its examples, and shard 0 not a tar.
    import glob as _glob
    paths = sorted(_glob.glob(shards.path))
    data = open(paths[3], "rb").read()
    with open(paths[3], "wb") as f:
        f.write(data[: len(data) * 3 // 5])
    with open(paths[0], "wb") as f:
        f.write(b"this is not a tar file")
    out, stats = _all(shards)
    got = sorted(int(c.split()[1]) for c in out["caption"])
    from_3 = [i for i in got if i >= 15]
    assert 1 <= len(from_3) < 5 and from_3 == list(range(15, 15 + len(from_3)))  # a prefix
    assert [i for i in got if i < 15] == [5, 6, 8, 9, 10, 11, 12, 14]  # shards 1, 2 as before
    assert out["image"].shape[0] == len(got)


def test_webdataset_bad_pattern_names_it(tmp_path):
    c = default_data_config("webdataset")
    c.path = str(tmp_path / "nothing-*.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        make_iterator(c, split="train", process_index=0, process_count=1, local_batch_size=2,
                      seed=0)


# ------------------------------------------------------------------------------------ folder
@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    lines = []
    for i in range(10):
        (d / f"{i}.png").write_bytes(_png(_colour(i), size=(48, 32)))
        lines.append({"file": f"{i}.png", "caption": f"image {i}"})
    (d / "3.png").write_bytes(b"not an image")
    lines[5]["caption"] = ""
    del lines[6]["caption"]
    lines.append({"file": "missing.png", "caption": "gone"})
    (d / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    c = default_data_config("folder")
    c.path, c.resolution, c.num_threads = str(d), 32, 2
    return c


def test_folder_reads_and_counts_skips(folder):
    out, stats = _all(folder, bs=3)
    assert sorted(out["caption"]) == sorted(f"image {i}" for i in (0, 1, 2, 4, 7, 8, 9))
    assert (stats["skipped_corrupt"], stats["skipped_no_caption"],
            stats["skipped_missing_file"]) == (2, 2, 1)
    assert out["image"].shape == (7, 32, 32, 3)
    i = int(out["caption"][0].split()[1])
    assert np.array_equal(preprocess.denormalize(out["image"][0, 5, 5]), _colour(i))


def test_folder_resume_and_disjoint_processes(folder):
    kw = dict(split="train", process_count=1, local_batch_size=4, seed=9)
    it = make_iterator(folder, process_index=0, **kw)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    fresh = make_iterator(folder, process_index=0, **kw)
    fresh.set_state(json.loads(json.dumps(state)))
    for a, b in zip(expected, _take(fresh, 2)):
        assert _same(a, b)
    a, _ = _all(folder, 0, 2)
    b, _ = _all(folder, 1, 2)
    assert not set(a["index"]) & set(b["index"]) and len(a["index"]) + len(b["index"]) == 7


def test_folder_errors_name_the_path(tmp_path):
    c = default_data_config("folder")
    c.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_iterator(c, split="train", process_index=0, process_count=1, local_batch_size=2,
                      seed=0)
    (tmp_path / "captions.jsonl").write_text("\n")
    c.path = str(tmp_path)
    with pytest.raises(ValueError, match="lists no images"):
        make_iterator(c, split="train", process_index=0, process_count=1, local_batch_size=2,
                      seed=0)


def test_all_corrupt_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "x"}))
    c = default_data_config("folder")
    c.path = str(tmp_path)
    it = make_iterator(c, split="train", process_index=0, process_count=1, local_batch_size=2,
                       seed=0)
    with pytest.raises(RuntimeError, match="every example"):
        next(it)


# -------------------------------------------------------------------------------- preprocess
def test_resize_center_crop_and_random_crop():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre square of the wide image is white
    out = preprocess.resize_center_crop(img, 20)
    # Centred: white up to the rim (bicubic lets the black sides bleed in by a few levels only).
    assert out.shape == (20, 20, 3) and out[:, 1:-1].min() == 255 and out.min() > 200
    tall = preprocess.resize_center_crop(np.zeros((90, 30, 3), np.uint8), 16)
    assert tall.shape == (16, 16, 3)
    images = np.arange(2 * 8 * 8 * 1).reshape(2, 8, 8, 1)
    crops = preprocess.random_crop(np.random.default_rng(0), images, 3)
    assert crops.shape == (2, 3, 3, 1)
    for img, crop in zip(images, crops):
        y, x = np.argwhere(img[..., 0] == crop[0, 0, 0])[0]
        assert np.array_equal(img[y:y + 3, x:x + 3], crop)
    with pytest.raises(ValueError, match="larger"):
        preprocess.random_crop(np.random.default_rng(0), images, 9)
    assert preprocess.normalize(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]


def test_generated_webdataset_shards_read_back(tmp_path):
    """data.synthetic writes img2dataset shards the webdataset reader reads as the scenes."""
    from unclip_jax.data import shapes, sources, synthetic
    
    pattern = synthetic.write_webdataset_shards(str(tmp_path), num_examples=7, shard_size=3,
                                                image_size=32, seed=5, split="test")
    assert sorted(os.listdir(tmp_path)) == ["00000.tar", "00001.tar", "00002.tar"]
    src = sources.WebDatasetSource(pattern, 0, 1)
    assert len(src) == 7
    for i in (0, 4, 6):
        rec = src[i]
        _, caption, image = shapes.example(5, shapes.SPLIT_IDS["test"], i, size=32)
        assert rec["caption"] == caption
        decoded = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"), np.float32)
        assert np.abs(decoded - image).mean() < 8  # JPEG (q95, 4:2:0) at 32 px; two scenes differ by > 18
