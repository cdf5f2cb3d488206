"""CLIP embedding caches: written aligned with the dataset, split across processes, read back."""
import glob
import json
import os
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import pytest

from unclip_jax import embed
from unclip_jax.data import cache, default_data_config, make_iterator, preprocess, sources

NUM_TRAIN, NUM_TEST = 40, 12
TOKENS = 12


class StandInEncoder:
    """Deterministic CLIP stand-in: a fixed projection of 8x8-pooled pixels; hashed words."""

    def __init__(self, dim=16):
        rng = np.random.default_rng(123)
        self.proj = rng.normal(size=(8 * 8 * 3, dim)).astype(np.float32)
        self.table = rng.normal(size=(1000, dim)).astype(np.float32)

    def encode_images(self, images):
        b, h, w, _ = images.shape
        pooled = images.reshape(b, 8, h // 8, 8, w // 8, 3).mean((2, 4))
        return pooled.reshape(b, -1) @ self.proj

    def encode_texts(self, captions):
        tokens = np.zeros((len(captions), TOKENS), np.int32)
        for i, c in enumerate(captions):
            ids = [zlib.crc32(w.encode()) % 999 + 1 for w in c.split()][:TOKENS]
            tokens[i, :len(ids)] = ids
        emb = self.table[tokens] * (tokens > 0)[..., None]
        return {"text_embedding": emb.sum(1), "tokens": tokens, "token_embeddings": emb}


def make_encoder(config):
    return StandInEncoder()


def source_config(data_dir):
    c = default_data_config("shapes")
    c.data_dir = str(data_dir)
    c.shapes.num_train, c.shapes.num_test = NUM_TRAIN, NUM_TEST
    c.resolution, c.num_threads = 32, 2
    return c


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A train cache written by 2 processes (shard size 7, batch 5: several shards each)."""
    root = tmp_path_factory.mktemp("cache")
    src = source_config(root / "tfds")
    out = str(root / "emb")
    for p in range(2):
        embed.write_cache(StandInEncoder(), src, split="train", out_dir=out, process_index=p,
                          process_count=2, batch_size=5, shard_size=7)
    return src, out


def _source_example(src_cfg, index):
    raw = sources.open_source(src_cfg, "train", 0, 1).read(index)
    img = preprocess.resize_center_crop(preprocess.decode(raw["image"]), src_cfg.resolution)
    return preprocess.normalize(img)[None], raw["caption"]


def test_cache_rows_are_the_encoder_applied_to_their_example(written):
    src, out = written
    index = cache.load_field(out, "train", "index")
    assert sorted(index) == list(range(NUM_TRAIN))
    img_emb = cache.load_field(out, "train", "image_embedding")
    txt_emb = cache.load_field(out, "train", "text_embedding")
    tokens = cache.load_field(out, "train", "tokens")
    enc = StandInEncoder()
    for row in range(0, NUM_TRAIN, 3):
        image, caption = _source_example(src, int(index[row]))
        np.testing.assert_allclose(img_emb[row], enc.encode_images(image)[0], rtol=1e-5,
                                   atol=1e-5)
        t = enc.encode_texts([caption])
        np.testing.assert_allclose(txt_emb[row], t["text_embedding"][0], rtol=1e-5, atol=1e-5)
        assert np.array_equal(tokens[row], t["tokens"][0])


def test_each_process_writes_its_own_shards(written):
    _, out = written
    split_dir, manifests = cache.load_manifests(out, "train")
    assert [m["process_index"] for m in manifests] == [0, 1]
    for m in manifests:
        idx = np.concatenate([np.load(os.path.join(split_dir, f"index.{s['name']}.npy"))
                              for s in m["shards"]])
        assert list(idx) == list(range(m["process_index"], NUM_TRAIN, 2))  # source order
        assert [s["count"] for s in m["shards"]] == [10, 10]  # flushed at >= 7 rows, batch 5
    assert manifests[0]["fields"]["token_embeddings"] == {"shape": [TOKENS, 16],
                                                          "dtype": "bfloat16"}


def test_embed_cache_iterator_joins_images_and_resumes(written):
    src, out = written
    c = default_data_config("embed_cache")
    c.cache_dir, c.join_images, c.resolution, c.num_threads = out, True, 32, 2
    kw = dict(split="train", process_index=0, process_count=1, local_batch_size=6, seed=0)
    it = make_iterator(c, **kw)
    b = next(it)
    assert set(b) == {"image", "caption", "index", "image_embedding", "text_embedding",
                      "tokens", "token_embeddings"}
    enc = StandInEncoder()
    np.testing.assert_allclose(enc.encode_images(b["image"]), b["image_embedding"], rtol=1e-5,
                               atol=1e-5)
    for i, cap in zip(b["index"], b["caption"]):
        assert _source_example(src, int(i))[1] == cap
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(8)]  # crosses epochs
    fresh = make_iterator(c, **kw)
    fresh.set_state(state)
    for a, e in zip(expected, (next(fresh) for _ in range(8))):
        assert all(np.array_equal(a[k], e[k]) for k in a)
    c.join_images = False
    b = next(make_iterator(c, **kw))
    assert "image" not in b and b["tokens"].dtype == np.int32


def test_token_embeddings_stored_in_bfloat16(tmp_path, written):
    """The default cache holds the bf16 rounding of the encoder's token embeddings, in half the
    bytes of a float32 cache of the same rows; readers get float32 and check the dtype."""
    import ml_dtypes
    src, out = written
    f32 = str(tmp_path / "f32")
    for p in range(2):
        embed.write_cache(StandInEncoder(), src, split="train", out_dir=f32, process_index=p,
                          process_count=2, batch_size=5, shard_size=7, token_dtype="float32")
    exact = cache.load_field(f32, "train", "token_embeddings")
    got = cache.load_field(out, "train", "token_embeddings")
    assert got.dtype == np.float32 and exact.dtype == np.float32
    rounded = exact.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, rounded)
    assert not np.array_equal(got, exact)     # the rounding happened (the test can fail)

    def size(d):
        return sum(os.path.getsize(p) - 128   # .npy header
                   for p in glob.glob(os.path.join(d, "train", "token_embeddings.*.npy")))
    assert size(out) * 2 == size(f32)

    c = default_data_config("embed_cache")
    c.cache_dir, c.num_threads = out, 0
    kw = dict(split="train", process_index=0, process_count=1, local_batch_size=40, seed=0,
              shuffle=False, num_epochs=1)
    b = next(make_iterator(c, **kw))
    assert b["token_embeddings"].dtype == np.float32
    row = {int(i): r for r, i in enumerate(cache.load_field(out, "train", "index"))}
    rows = [row[int(i)] for i in b["index"]]
    np.testing.assert_array_equal(b["token_embeddings"], got[rows])
    # A float32 cache read by a config expecting bfloat16: named, with the flag that reads it.
    c.cache_dir = f32
    with pytest.raises(ValueError, match="stores token_embeddings as float32.*"
                                         "token_dtype=float32"):
        make_iterator(c, **kw)
    c.token_dtype = "float32"
    np.testing.assert_array_equal(next(make_iterator(c, **kw))["token_embeddings"], exact[rows])
    # A manifest without the dtype record, and files that disagree with it.
    man = os.path.join(f32, "train", "manifest.p0000.json")
    m = json.load(open(man))
    del m["fields"]["token_embeddings"]["dtype"]
    json.dump(m, open(man, "w"))
    with pytest.raises(ValueError, match="records no dtype for field 'token_embeddings'"):
        make_iterator(c, **kw)
    m["fields"]["token_embeddings"]["dtype"] = "bfloat16"
    json.dump(m, open(man, "w"))
    with pytest.raises(ValueError, match=r"token_embeddings\.p0000\.s00000\.npy' holds float32"):
        cache.load_field(f32, "train", "token_embeddings")


def test_embed_cache_errors(tmp_path, written):
    _, out = written
    c = default_data_config("embed_cache")
    c.cache_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no embedding cache for split 'train'"):
        make_iterator(c, split="train", process_index=0, process_count=1, local_batch_size=2,
                      seed=0)
    # A cache with one of its two process manifests missing is refused.
    os.makedirs(tmp_path / "train")
    with open(os.path.join(out, "train", "manifest.p0001.json")) as f:
        (tmp_path / "train" / "manifest.p0001.json").write_text(f.read())
    with pytest.raises(ValueError, match="incomplete"):
        make_iterator(c, split="train", process_index=0, process_count=1, local_batch_size=2,
                      seed=0)


def test_embed_cli(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(f"""
import ml_collections
from unclip_jax.data import default_data_config
from unclip_jax.embed import embed_config

def get_config():
    c = ml_collections.ConfigDict()
    c.data = default_data_config("shapes")
    c.data.data_dir = {str(tmp_path / 'tfds')!r}
    c.data.shapes.num_train, c.data.shapes.num_test = {NUM_TRAIN}, {NUM_TEST}
    c.data.resolution, c.data.num_threads = 32, 0
    c.embed = embed_config(encoder="test_cache:make_encoder", batch_size=8)
    return c
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "emb"
    r = subprocess.run([sys.executable, "-m", "unclip_jax.embed", f"--config={cfg_file}",
                        f"--out={out}", "--process_index=0", "--process_count=1"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"train: {NUM_TRAIN} examples" in r.stdout and f"test: {NUM_TEST} examples" in r.stdout
    idx = cache.load_field(str(out), "test", "index")
    emb = cache.load_field(str(out), "test", "image_embedding")
    assert list(idx) == list(range(NUM_TEST))
    it = make_iterator(source_config(tmp_path / "tfds"), split="test", process_index=0,
                       process_count=1, local_batch_size=NUM_TEST, seed=0, num_epochs=1)
    np.testing.assert_allclose(emb, StandInEncoder().encode_images(next(it)["image"]),
                               rtol=1e-5, atol=1e-5)


def test_bad_encoder_spec():
    c = ml_collections.ConfigDict(dict(embed=dict(encoder="no_colon")))
    with pytest.raises(ValueError, match="module:factory"):
        embed.build_encoder(c)
    c.embed.encoder = "unclip_jax.data:missing_factory"
    with pytest.raises(ValueError, match="missing_factory"):
        embed.build_encoder(c)
