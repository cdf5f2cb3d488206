"""The web-data whole stack (experiments/webdata.py:smoke) end to end on generated webdataset
shards and a tiny random HF CLIP: the cache and the evaluation against direct computations
with the imported CLIP, sampling and a variation through the sample CLI, and bad input refused
before anything is written."""
import io
import json
import os
import shutil
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments import webdata
from unclip_jax import sample
from unclip_jax.data import preprocess
from unclip_jax.models import clip_import
from unclip_jax.models.clip import CLIP
from unclip_jax.recipes.runner import run_pipeline

from helpers.trainer import snapshot

# A CLIP config.json's fields that the importer reads (sizes of the smoke CLIP).
_TINY_CFG = {"model_type": "clip", "projection_dim": 16,
             "text_config": {"vocab_size": 100, "max_position_embeddings": 77, "hidden_size": 32,
                             "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 64},
             "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 24,
                               "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 96}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("webdata") / "run")
    result = run_pipeline(webdata.get_config("smoke"), wd)
    return wd, result


@pytest.fixture(scope="module")
def hf(run):
    """Our import of the run's HF CLIP, used directly (no pipeline, no cache)."""
    model, params, tok = clip_import.load_hf_clip(os.path.join(run[0], "inputs", "hf_clip"))
    return model, params, tok


def _encode_images(hf, images):
    model, params, _ = hf
    return np.asarray(model.apply({"params": params}, jnp.asarray(images),
                                  method=CLIP.encode_image)["embedding"])


def _encode_texts(hf, captions):
    model, params, tok = hf
    tokens, _ = tok.encode(captions)
    out = model.apply({"params": params}, jnp.asarray(tokens), method=CLIP.encode_text)
    return tokens, np.asarray(out["embedding"]), np.asarray(out["token_encodings"])


def test_layout_and_imported_clip_stage(run):
    wd, _ = run
    link = json.load(open(os.path.join(wd, "clip", "hf_clip.json")))
    assert link == {"hf_dir": os.path.join(wd, "inputs", "hf_clip")}
    assert not os.path.exists(os.path.join(wd, "clip", "checkpoints"))  # nothing trained
    for stage in ("diffusion_prior", "ar_prior", "decoder", "upsampler"):
        assert os.path.isdir(os.path.join(wd, stage, "checkpoints", "1")), stage
    done = json.load(open(os.path.join(wd, "embed", "complete.json")))
    assert done == {"train": 32, "test": 8}
    assert os.path.exists(os.path.join(wd, "samples", "grid.png"))
    # The stages' sizes follow the imported CLIP (projection_dim 16, 77 tokens, width 32).
    from unclip_jax.train.checkpoint import read_config_json
    prior = read_config_json(os.path.join(wd, "diffusion_prior"))["model"]
    assert (prior["embed_dim"], prior["text_ctx"], prior["text_dim"]) == (16, 77, 32)
    dec = read_config_json(os.path.join(wd, "decoder"))["model"]
    tok = clip_import.Tokenizer.from_hf(link["hf_dir"])
    assert (dec["clip_dim"], dec["text_ctx"], dec["text_pad_id"], dec["text_vocab"]) == \
        (16, 77, tok.pad_id, tok.vocab_size)


def test_cache_holds_the_hf_clip_embeddings_of_the_shards(run, hf):
    import transformers

    from unclip_jax.data import cache
    from unclip_jax.data.sources import WebDatasetSource
    wd = run[0]
    cdir = os.path.join(wd, "embed")
    fields = {f: np.asarray(cache.load_field(cdir, "train", f)) for f in
              ("image_embedding", "text_embedding", "tokens", "token_embeddings", "index")}
    captions = json.load(open(os.path.join(cdir, "train", "caption.p0000.s00000.json")))[:8]
    src = WebDatasetSource(os.path.join(wd, "inputs", "web", "train", "*.tar"), 0, 1)
    images = np.stack([preprocess.normalize(preprocess.resize_center_crop(
        preprocess.decode(src.read(int(i))["image"]), 32)) for i in fields["index"][:8]])
    assert [src.read(int(i))["caption"] for i in fields["index"][:8]] == captions
    np.testing.assert_allclose(fields["image_embedding"][:8], _encode_images(hf, images),
                               atol=2e-5)
    tokens, z_t, enc = _encode_texts(hf, captions)
    np.testing.assert_allclose(fields["text_embedding"][:8], z_t, atol=2e-5)
    np.testing.assert_allclose(fields["token_embeddings"][:8], enc, atol=1e-2)  # bf16 or f32
    # The cached ids are the HF tokenizer's: 77 tokens, padded with its own pad id.
    ref = transformers.AutoTokenizer.from_pretrained(os.path.join(wd, "inputs", "hf_clip"))
    ids = ref(captions, padding="max_length", max_length=77)["input_ids"]
    np.testing.assert_array_equal(fields["tokens"][:8], np.asarray(ids))
    assert fields["tokens"].shape[1] == 77 and (fields["tokens"][:, -1] == ref.pad_token_id).all()
    # Image embeddings differ between images (the smoke CLIP is not a constant function).
    cos = fields["image_embedding"] @ fields["image_embedding"].T
    assert cos.min() < 0.99


def test_evaluation_scores_with_the_same_clip(run, hf):
    from unclip_jax.images import from_uint8
    out = os.path.join(run[0], "eval", "webdata")
    res = json.load(open(os.path.join(out, "eval.json")))
    s = np.load(os.path.join(out, "samples.npz"), allow_pickle=True)
    images, captions = s["images"], [str(c) for c in s["caption"]]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8   # the upsampler's size
    gen = _encode_images(hf, from_uint8(images))
    _, z_t, _ = _encode_texts(hf, captions)
    cos = (gen * z_t).sum(1) / np.linalg.norm(gen, axis=1) / np.linalg.norm(z_t, axis=1)
    assert res["metrics"]["clip_score"] == pytest.approx(100 * np.maximum(cos, 0).mean(),
                                                         rel=1e-4, abs=1e-4)
    # The priors against the true z_i of the held-out images (the first 4 test examples).
    from unclip_jax.data.sources import WebDatasetSource
    src = WebDatasetSource(os.path.join(run[0], "inputs", "web", "test", "*.tar"), 0, 1)
    real = np.stack([preprocess.normalize(preprocess.resize_center_crop(
        preprocess.decode(src[i]["image"]), 32)) for i in range(4)])
    assert captions == [src[i]["caption"] for i in range(4)]
    z_i = _encode_images(hf, real)
    base = ((z_i * z_t).sum(1) / np.linalg.norm(z_i, axis=1) / np.linalg.norm(z_t, axis=1))
    for name in ("diffusion", "ar"):
        p = res["prior"][name]
        assert p["n"] == 4 and p["cos_text_true"] == pytest.approx(base.mean(), abs=1e-4)
        assert np.isfinite(p["cos_sample_true"])


def test_sample_cli_text_and_variation(run, tmp_path):
    wd = run[0]
    before = snapshot(wd)
    # The samples step's settings and batch (4), so the text -> image program is compiled once.
    fast = ["--prior_steps=2", "--decoder_steps=2", "--upsampler_steps=ddim2"]
    res = sample.run(["--workdir", wd, "--prompt", "a red circle", "--num", "4",
                      "--out", str(tmp_path / "t")] + fast)
    assert res["images"].shape == (4, 32, 32, 3) and np.isfinite(res["images"]).all()
    assert res["images"].std() > 0
    png = np.asarray(Image.open(tmp_path / "t" / "0000.png"))
    assert png.shape == (32, 32, 3)
    res = sample.run(["variations", "--workdir", wd, "--image", str(tmp_path / "t" / "0000.png"),
                      "--num", "2", "--no_upsample", "--out", str(tmp_path / "v"),
                      "--decoder_steps=2"])
    assert res["images"].shape == (2, 16, 16, 3) and np.isfinite(res["images"]).all()
    assert snapshot(wd) == before   # sampling only reads the workdir


def test_clip_stage_linked_to_a_missing_folder(tmp_path):
    from unclip_jax.inference import load_clip
    stage = tmp_path / "clip"
    stage.mkdir()
    (stage / "hf_clip.json").write_text(json.dumps({"hf_dir": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match=f"CLIP stage {stage} imports .*gone.* does not "
                       "exist"):
        load_clip(str(stage))


# ------------------------------------------------------------------------------ bad input
def _config(run, hf_dir=None, data_path=None):
    wd = run[0]
    c = webdata.get_config("smoke")
    c.make_inputs = False
    c.clip_import.hf_dir = hf_dir or os.path.join(wd, "inputs", "hf_clip")
    c.data.path = data_path or os.path.join(wd, "inputs", "web", "{split}", "*.tar")
    return c


def _refused(config, workdir, match, exc=(ValueError, FileNotFoundError)):
    """run_pipeline raises naming the problem, and the workdir is left as it was."""
    before = snapshot(workdir)
    with pytest.raises(exc, match=match):
        run_pipeline(config, workdir)
    assert snapshot(workdir) == before


@pytest.fixture
def fresh(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "keep.txt").write_text("user data")
    return str(wd)


def test_hf_clip_folder_missing_a_file(run, tmp_path, fresh):
    bad = tmp_path / "clip"
    shutil.copytree(os.path.join(run[0], "inputs", "hf_clip"), bad)
    os.remove(bad / "model.safetensors")
    _refused(_config(run, str(bad)), fresh, f"{bad}.*has no .*safetensors")
    for f in ("vocab.json", "tokenizer.json"):
        os.remove(bad / f)
    shutil.copy(os.path.join(run[0], "inputs", "hf_clip", "model.safetensors"), bad)
    _refused(_config(run, str(bad)), fresh, f"{bad}.*has no tokenizer: expected vocab.json")
    os.remove(bad / "config.json")
    _refused(_config(run, str(bad)), fresh, f"{bad}.*has no config.json")


def test_hf_folder_of_another_architecture(run, tmp_path, fresh):
    bad = tmp_path / "bert"
    shutil.copytree(os.path.join(run[0], "inputs", "hf_clip"), bad)
    (bad / "config.json").write_text(json.dumps(
        {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32}))
    _refused(_config(run, str(bad)), fresh, "config.json is not a CLIP model.*bert")


def test_shards_without_captions(run, tmp_path, fresh):
    for split in ("train", "test"):
        d = tmp_path / "shards" / split
        d.mkdir(parents=True)
        with tarfile.open(d / "00000.tar", "w") as tar:
            for k in range(3):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32)).save(buf, format="JPEG")
                for name, data in ((f"{k:05d}.jpg", buf.getvalue()),
                                   (f"{k:05d}.json", json.dumps({"key": k}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    c = _config(run, data_path=str(tmp_path / "shards" / "{split}" / "*.tar"))
    _refused(c, fresh, r"split 'train' \(.*00000.tar\).*KEY.txt or the 'caption' field")


def test_tokenizer_that_does_not_match_the_cache(run, tmp_path):
    """A workdir whose cache was written with one CLIP, run with another CLIP's tokenizer."""
    wd = tmp_path / "wd"
    shutil.copytree(os.path.join(run[0], "embed"), wd / "embed")
    other = str(tmp_path / "other_clip")
    clip_import.write_random_hf_clip(other, words=["circle"], text_width=32, text_depth=1,
                                     text_heads=2, vision_width=24, vision_depth=1,
                                     vision_heads=2, image_size=32, patch=8, projection_dim=16)
    _refused(_config(run, other), str(wd), f"tokenizer in {other} does not give the token ids "
             f"cached in {wd}/embed/train")


def test_evaluating_on_the_runs_data_needs_a_trained_clip():
    """data_source='run' reads the data the run's CLIP trained on: an imported CLIP has none."""
    import types

    from unclip_jax.eval.config import eval_config
    from unclip_jax.eval.dataset import data_config
    from unclip_jax.eval.plan import EvalError
    clip = types.SimpleNamespace(config=clip_import.clip_stage_config("hf", _TINY_CFG),
                                 workdir="runs/w/clip")
    assert clip.config.model.embed_dim == 16 and clip.config.tokenizer.dir == "hf"
    with pytest.raises(EvalError, match="runs/w/clip.*imported.*set config.data"):
        data_config(eval_config(data_source="run"), types.SimpleNamespace(clip=clip), 32)
