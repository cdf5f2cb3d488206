"""Each paper config's `:smoke` variant trains 2 steps with no input: it makes its tiny data in
the format its docstring prescribes (unclip_jax.stages.smoke) and trains at tiny widths."""
import glob
import json
import os
import tarfile

import numpy as np
import pytest

from unclip_jax.data import cache
from unclip_jax.data.preprocess import decode

from helpers.trainer import load_config

PAPER = ("diffusion_prior", "ar_prior", "decoder_64", "upsampler_256", "upsampler_1024")


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r]


def _check_shards(root, image_size):
    """img2dataset layout: KEY.jpg of the stage's size, KEY.txt caption, KEY.json."""
    shards = sorted(glob.glob(os.path.join(root, "web", "train", "*.tar")))
    assert len(shards) == 2
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
        key = names[0].split(".")[0]
        image = decode(tar.extractfile(f"{key}.jpg").read())
        caption = tar.extractfile(f"{key}.txt").read().decode()
        assert json.loads(tar.extractfile(f"{key}.json").read())["caption"] == caption
    assert image.shape == (image_size, image_size, 3)


def _check_cache(root, config):
    """The cache of the random HF CLIP, written by `unclip_jax.embed` with its importer: CLIP's
    77 caption token ids (from the HF tokenizer in tokenizer.dir) and bfloat16 token encodings."""
    from unclip_jax.data.tokenizer import Tokenizer
    assert config.data.cache_dir == os.path.join(root, "embed_cache")
    assert config.tokenizer.dir == os.path.join(root, "hf_clip")
    assert os.path.exists(os.path.join(root, "hf_clip", "model.safetensors"))
    _, manifests = cache.load_manifests(config.data.cache_dir, "train")
    fields = manifests[0]["fields"]
    assert fields["token_embeddings"] == {"shape": [77, 32], "dtype": "bfloat16"}
    assert fields["image_embedding"]["shape"] == [16] and fields["tokens"]["shape"] == [77]
    assert manifests[0]["source"]["name"] == "webdataset"
    tok = Tokenizer.load(config.tokenizer.dir)
    assert tok.kind == "hf"
    with open(os.path.join(config.data.cache_dir, "train",
                           f"caption.{manifests[0]['shards'][0]['name']}.json")) as f:
        captions = json.load(f)[:4]
    np.testing.assert_array_equal(cache.load_field(config.data.cache_dir, "train", "tokens")[:4],
                                  tok.encode(captions)[0])


@pytest.fixture(scope="module")
def clip_smoke_data(tmp_path_factory):
    """The smoke data of the configs that read a CLIP cache: the same spec for all three, so it
    is made once (by the diffusion prior's config) and copied into each workdir, where
    `prepare` finds it written and reuses it."""
    from unclip_jax.stages.smoke import prepare
    specs = {n: load_config(f"paper/{n}.py", "smoke").smoke_data.to_dict()
             for n in ("diffusion_prior", "ar_prior", "decoder_64")}
    assert specs["diffusion_prior"] == specs["ar_prior"] == specs["decoder_64"]
    wd = tmp_path_factory.mktemp("clip_smoke")
    prepare(load_config("paper/diffusion_prior.py", "smoke"), str(wd))
    return str(wd / "smoke_data")


@pytest.mark.parametrize("name", PAPER)
def test_paper_smoke_trains_two_steps(name, tmp_path, request):
    import shutil

    from unclip_jax.main import run
    from unclip_jax.stages.smoke import prepare

    wd = str(tmp_path / "w")
    config = load_config(f"paper/{name}.py", "smoke")
    # One device, as on a user's CPU (8-way programs cost more to compile); the AR prior keeps
    # its data-parallel mesh over the 8 devices, a program shared with the GCS test's runs.
    config.mesh.num_devices = 0 if name == "ar_prior" else 1
    if config.smoke_data.clip.to_dict():
        shared = request.getfixturevalue("clip_smoke_data")
        # Absolute paths inside the cache manifest point at the shared shards: fine for a copy.
        shutil.copytree(shared, os.path.join(wd, "smoke_data"))
    out = run(config, wd)
    assert out["status"] == "done" and out["step"] == 2
    assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))
    losses = _losses(wd)
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and losses[0] != losses[1]
    assert out["params"] < 400_000   # tiny widths (the paper configs have 0.3B-3.6B)
    m = config.model
    root = os.path.join(wd, "smoke_data")
    prepared = prepare(config, wd)    # the same paths again: the data is made once
    if name.startswith("upsampler"):
        # The paper's 4x ratio and 1/4 crops (upsampler_1024's smoke at 128px, not 1024).
        assert m.base_channels == 8
        assert m.image_size == {"upsampler_1024": 128, "upsampler_256": 256}[name]
        assert m.image_size == 4 * m.low_res_size == config.data.resolution
        assert config.diffusion.crop_fraction == 0.25
        assert prepared.data.name == "webdataset"
        assert prepared.data.path == os.path.join(root, "web", "{split}", "*.tar")
        _check_shards(root, m.image_size)
        return
    _check_shards(root, 64)
    _check_cache(root, prepared)
    assert m.text_ctx == (256 if name == "decoder_64" else 77)
    if name == "diffusion_prior":
        assert (m.width, m.depth, m.text_dim) == (32, 2, 32)
    elif name == "ar_prior":
        from unclip_jax.models.ar_prior import ARCodec
        assert prepared.model.codec_path == os.path.join(root, "ar_codec.npz")
        assert ARCodec.load(prepared.model.codec_path).k == m.pca_components == 5
    else:
        # CLIP pads with its eos: the decoder's caption mask ends at the first eos, whatever
        # the padding, and the 77 cached tokens are padded to its 256 positions.
        from unclip_jax.data import make_iterator
        from unclip_jax.stages.decoder import decoder_batch
        from unclip_jax.data.tokenizer import Tokenizer
        assert m.base_channels == 16 and m.text_width == 32
        eos = Tokenizer.load(prepared.tokenizer.dir).eos_id
        b = next(make_iterator(prepared.data, split="train", process_index=0, process_count=1,
                               local_batch_size=4, seed=0))
        d = decoder_batch(prepared, b)
        assert d["tokens"].shape == d["token_mask"].shape == (4, 256)
        assert d["image"].shape == (4, 64, 64, 3)
        for row, mask in zip(d["tokens"], d["token_mask"]):
            last = int(np.argmax(row == eos))
            assert mask[:last + 1].all() and not mask[last + 1:].any()
        # Tokens written by another tokenizer (no eos of this one): named, not masked wrongly.
        other = dict(b, tokens=np.where(b["tokens"] == eos, eos - 1, b["tokens"]))
        with pytest.raises(ValueError, match=f"4 of 4 cached captions have no eos id {eos} of "
                                             f"the tokenizer in '{prepared.tokenizer.dir}'"):
            decoder_batch(prepared, other)
        # Sampling (inference.Pipeline, traced) builds the same mask as training.
        import jax.numpy as jnp
        from unclip_jax.stages.decoder import decoder_tokens
        tok, mask = decoder_tokens(prepared, jnp.asarray(b["tokens"]), jnp)
        np.testing.assert_array_equal(tok, d["tokens"])
        np.testing.assert_array_equal(mask, d["token_mask"])


def test_smoke_on_a_gcs_workdir_trains_and_resumes(clip_smoke_data, tmp_path, monkeypatch):
    """--workdir=gs://... (a local GCS emulator): `prepare` writes the smoke inputs into the
    bucket (the same cache as a local prepare's), the AR prior stage trains to step 1, resumes
    to step 2 (its codec fitted and written there once) and ends where an uninterrupted local
    run on the same data ends; nothing goes to a local folder named "gs:"."""
    import shutil

    from etils import epath

    from helpers.gcs import emulator
    from unclip_jax.main import run
    from unclip_jax.stages.smoke import prepare
    from unclip_jax.train.trainer import train
    monkeypatch.chdir(tmp_path)
    config = load_config("paper/ar_prior.py", "smoke")
    local = str(tmp_path / "local")
    shutil.copytree(clip_smoke_data, os.path.join(local, "smoke_data"))
    ref = run(config, local)
    with emulator() as bucket:
        wd = f"{bucket}/smoke/ar_prior"
        prepared = prepare(config, wd)
        root = f"{wd}/smoke_data"
        assert prepared.data.cache_dir == f"{root}/embed_cache"
        assert prepared.tokenizer.dir == f"{root}/hf_clip"
        assert prepared.model.codec_path == f"{root}/ar_codec.npz"
        for field in ("tokens", "image_embedding"):
            np.testing.assert_array_equal(
                cache.load_field(prepared.data.cache_dir, "train", field),
                cache.load_field(os.path.join(clip_smoke_data, "embed_cache"), "train", field))
        first = train(prepared, wd, stop_at=1)
        assert (first["step"], first["resumed_from"]) == (1, 0)
        codec = epath.Path(prepared.model.codec_path).stat().mtime
        out = run(config, wd)
        assert (out["status"], out["step"], out["resumed_from"]) == ("done", 2, 1)
        assert epath.Path(prepared.model.codec_path).stat().mtime == codec   # fitted once
        assert sorted(p.name for p in epath.Path(f"{wd}/checkpoints").iterdir()) == ["1", "2"]
        rows = [json.loads(r) for r in epath.Path(f"{wd}/metrics.jsonl").read_text().split("\n")
                if r]
    assert [r["loss"] for r in rows if "loss" in r] == _losses(local)
    from helpers.trainer import assert_trees_close
    assert_trees_close(out["state"].params, ref["state"].params)
    assert not [d for d, _, _ in os.walk(tmp_path) if os.path.basename(d) == "gs:"]
