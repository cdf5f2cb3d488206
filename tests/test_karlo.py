"""A converted tiny Karlo workdir (with the vision tower of Karlo's image-variations layout):
text -> image through the CLI code path and the Python API, sharded over the 8 fake devices,
from bfloat16 weights, image variations through the CLI, and the evaluator; the same workdir
converted to object storage (a local GCS emulator) samples, varies and evaluates the same."""
import json
import os
import shutil

import numpy as np
import pytest

import jax

from helpers.karlo_pipeline import build_tiny_karlo, build_tiny_variations
from unclip_jax import convert, karlo, parallel, sample
from unclip_jax.inference import Pipeline, SampleSettings

FEW = ["--prior_steps=karlo3", "--decoder_steps=karlo3", "--upsampler_steps=karlo2"]
PROMPTS = ["a red", "red"]


def few_settings():
    return karlo.preset_settings(SampleSettings(prior_steps="karlo3", decoder_steps="karlo3",
                                                upsampler_steps="karlo2"),
                                 keep={"prior_steps", "decoder_steps", "upsampler_steps"})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("karlo_wd")
    src, pipe = build_tiny_karlo(root)
    variations, _ = build_tiny_variations(root, pipe)
    wd = str(root / "wd")
    convert.convert_karlo(src, wd, image_encoder=variations)
    return dict(root=root, src=src, variations=variations, wd=wd)


@pytest.fixture(scope="module")
def workdir(built):
    return built["wd"]


@pytest.fixture(scope="module")
def bucket():
    from helpers.gcs import emulator
    with emulator() as b:
        yield b


@pytest.fixture(scope="module")
def gcs_workdir(built, bucket):
    """The tiny Karlo converted from the local folders straight into the bucket."""
    wd = f"{bucket}/karlo_wd"
    convert.convert_karlo(built["src"], wd, image_encoder=built["variations"])
    return wd


def _no_local_gs(*tops):
    """Nothing was written to a local folder named after a URL."""
    for top in tops:
        assert not [d for d, _, _ in os.walk(top) if os.path.basename(d) == "gs:"], top


@pytest.fixture(scope="module")
def api(workdir):
    """The Python API's text -> image for PROMPTS (seed 0, few steps): the reference below."""
    pipe = Pipeline.from_workdir(workdir)
    return pipe, pipe.text_to_image(PROMPTS, seed=0, settings=few_settings())


def test_preset_is_karlos_and_explicit_flags_win():
    s = karlo.preset_settings(SampleSettings(decoder_guidance=2.0), keep={"decoder_guidance"})
    assert (s.prior_steps, s.prior_guidance, s.decoder_steps, s.upsampler_steps) == (
        "karlo25", 4.0, "karlo25", "karlo7")
    assert s.decoder_guidance == 2.0 and s.num_candidates == 1


def test_text_to_image_through_cli_and_api(workdir, api, tmp_path):
    pipe, ref = api
    assert isinstance(pipe, karlo.KarloPipeline)
    out = str(tmp_path / "out")
    # A Karlo workdir samples with Karlo's preset (no --preset needed); the step flags win.
    res = sample.run(["--workdir", workdir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                      "--out", out, *FEW])
    imgs = res["images"]
    assert imgs.shape == (2, 16, 16, 3)          # super_res_first/last's sample_size
    assert np.all(np.isfinite(imgs)) and np.abs(imgs).max() <= 1.0
    with open(os.path.join(out, "settings.json")) as f:
        rec = json.load(f)
    assert (rec["prior_guidance"], rec["decoder_guidance"], rec["prior_steps"]) == (
        4.0, 8.0, "karlo3")
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "settings.json"]
    # The same seed and settings give the CLI's images (one compiled program per batch).
    np.testing.assert_allclose(ref["images"], imgs, atol=1e-5)
    assert ref["decoder_images"].shape == (2, 8, 8, 3)
    other = pipe.text_to_image(PROMPTS, seed=1, settings=few_settings())
    assert np.abs(other["images"] - ref["images"]).max() > 1e-3


def test_sharded_over_8_devices_with_fsdp_equals_one_device(workdir, api):
    _, ref = api
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8}, jax.devices()[:8])
    pipe = karlo.KarloPipeline.from_workdir(workdir, mesh=mesh, fsdp=True)
    # The large weights are split 8 ways, the small ones replicated.
    w = pipe.params["decoder"]["unet"]["up_1_0"]["conv_in"]["Conv_0"]["kernel"]
    assert w.size >= karlo.FSDP_MIN_SIZE
    assert w.addressable_shards[0].data.size == w.size // 8
    b = pipe.params["decoder"]["unet"]["up_1_0"]["conv_in"]["Conv_0"]["bias"]
    assert b.addressable_shards[0].data.size == b.size
    out = pipe.text_to_image(PROMPTS, seed=0, settings=few_settings())   # 2 rows, padded to 8
    for k in ("images", "decoder_images", "image_embedding"):
        np.testing.assert_allclose(out[k], ref[k], atol=1e-4, err_msg=k)


def test_convert_reads_a_gcs_source(built, bucket, tmp_path):
    """--src and --image_encoder on object storage (a local GCS emulator): the same manifest
    and weights as the local conversion, the URL recorded as the source, nothing written to a
    local folder named "gs:"."""
    import orbax.checkpoint as ocp

    from unclip_jax import paths
    paths.upload(built["src"], f"{bucket}/karlo")
    paths.upload(built["variations"], f"{bucket}/variations")
    wd = str(tmp_path / "wd")
    man = convert.convert_karlo(f"{bucket}/karlo", wd, image_encoder=f"{bucket}/variations")
    with open(os.path.join(built["wd"], "manifest.json")) as f:
        ref = json.load(f)
    assert man["source"] == f"{bucket}/karlo"
    assert man["image_encoder_source"].startswith(f"{bucket}/variations")
    assert json.loads(json.dumps(man["tensors"])) == ref["tensors"]
    for name in ("prior", "decoder", "image_encoder"):
        a, b = (ocp.StandardCheckpointer().restore(os.path.join(w, name))
                for w in (wd, built["wd"]))
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not any("gs:" in d for _, dirs, _ in os.walk(tmp_path) for d in dirs)


def test_gcs_workdir_samples_as_the_local_one(workdir, gcs_workdir, api, bucket, tmp_path,
                                              monkeypatch):
    """convert --out=gs://...: the same files as the local conversion; Pipeline.from_workdir
    and `sample` (its --out in the bucket too) read it and give the local workdir's images."""
    from PIL import Image
    from etils import epath

    from unclip_jax.images import to_uint8
    monkeypatch.chdir(tmp_path)
    pipe, ref = api
    wd = epath.Path(gcs_workdir)
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(wd) == sorted(os.listdir(workdir))
    for f in ("karlo.json", "manifest.json"):
        assert json.loads((wd / f).read_text()) == json.loads(open(os.path.join(workdir, f)).read())
    assert names(wd / "tokenizer") == sorted(os.listdir(os.path.join(workdir, "tokenizer")))
    remote = Pipeline.from_workdir(gcs_workdir)
    assert isinstance(remote, karlo.KarloPipeline)
    jax.tree.map(np.testing.assert_array_equal, remote.params, pipe.params)
    out = remote.text_to_image(PROMPTS, seed=0, settings=few_settings())
    for k in ("images", "decoder_images", "image_embedding"):
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    res = sample.run(["--workdir", gcs_workdir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                      "--out", f"{bucket}/karlo_out", *FEW])
    np.testing.assert_allclose(res["images"], ref["images"], atol=1e-5)
    assert res["record"]["workdir"] == gcs_workdir
    out_dir = epath.Path(f"{bucket}/karlo_out")
    assert names(out_dir) == ["0000.png", "0001.png", "settings.json"]
    with (out_dir / "0001.png").open("rb") as f:
        np.testing.assert_array_equal(np.asarray(Image.open(f)), to_uint8(res["images"])[1])
    _no_local_gs(tmp_path, os.path.dirname(workdir))


def test_gcs_workdir_bad_paths_are_named(built, gcs_workdir, bucket, tmp_path, monkeypatch):
    """A missing bucket, an existing --out, a bad input (nothing written to the bucket) and a
    workdir that is not there: each one error naming the URL. A conversion that fails while
    writing removes what it wrote."""
    from etils import epath

    from unclip_jax import paths
    from unclip_jax.models.karlo_import import KarloFormatError
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket does not exist"):
        convert.convert_karlo(built["src"], "gs://no-such-bucket/karlo")
    with pytest.raises(FileExistsError, match=gcs_workdir):
        convert.convert_karlo(built["src"], gcs_workdir)
    bad = str(tmp_path / "bad")
    shutil.copytree(built["src"], bad)
    shutil.rmtree(os.path.join(bad, "super_res_last"))
    with pytest.raises(KarloFormatError, match="super_res_last"):
        convert.convert_karlo(bad, f"{bucket}/bad_wd")
    paths.refresh(f"{bucket}/bad_wd")
    assert not epath.Path(f"{bucket}/bad_wd").exists()
    written, save = [], convert._save_params

    def fail_second(path, params):   # e.g. the connection lost after the first checkpoint
        if written:
            raise OSError("injected write failure")
        written.append(path)
        save(path, params)
    monkeypatch.setattr(convert, "_save_params", fail_second)
    with pytest.raises(OSError, match="injected"):
        convert.convert_karlo(built["src"], f"{bucket}/broken_wd")
    assert written == [f"{bucket}/broken_wd/prior"]
    paths.refresh(f"{bucket}/broken_wd")
    assert not epath.Path(f"{bucket}/broken_wd").exists()
    missing = f"{bucket}/no_workdir"
    with pytest.raises(FileNotFoundError, match=missing):
        Pipeline.from_workdir(missing)
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket"):
        sample.run(["--workdir", gcs_workdir, "--prompt", "red", "--out",
                    "gs://no-such-bucket/out", *FEW])


def test_bfloat16_workdir_loads_and_is_close_to_float32(built, api, tmp_path):
    _, ref = api
    wd16 = str(tmp_path / "wd16")
    convert.convert_karlo(built["src"], wd16, "bfloat16", image_encoder=built["variations"])
    with open(os.path.join(wd16, "manifest.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    pipe = Pipeline.from_workdir(wd16)
    import orbax.checkpoint as ocp
    stored = ocp.StandardCheckpointer().restore(os.path.join(wd16, "decoder"))
    assert {str(a.dtype) for a in jax.tree.leaves(stored)} == {"bfloat16"}
    out = pipe.text_to_image(PROMPTS, seed=0, settings=few_settings())
    assert np.all(np.isfinite(out["images"])) and out["images"].shape == ref["images"].shape

    # bfloat16 keeps 8 bits of mantissa: weights move by up to 2^-9 relative, and the models'
    # outputs by about that, amplified a little through the layers and the prior's steps (the
    # tiny random decoder's sampled pixels, clipped at +-1 under guidance 8, are too chaotic to
    # compare: its single denoising output is compared instead).
    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
    assert 0 < rel(out["text_embedding"], ref["text_embedding"]) < 1e-2
    assert 0 < rel(out["image_embedding"], ref["image_embedding"]) < 3e-2
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 8, 8, 3)).astype(np.float32)
    t = np.array([999, 300], np.int32)
    ref_pipe = api[0]
    dec = jax.jit(ref_pipe.program.decoder.apply)
    kw = dict(token_mask=np.ones((2, 8), bool), text_emb=ref["text_embedding"],
              text_states=r.standard_normal((2, 8, 16)).astype(np.float32))
    y32, y16 = (dec({"params": p.params["decoder"]}, x, t, ref["image_embedding"], **kw)
                for p in (ref_pipe, pipe))
    assert 0 < rel(y16, y32) < 3e-2


def test_variation_of_an_image_through_cli(workdir, gcs_workdir, bucket, tmp_path):
    from etils import epath

    from unclip_jax import paths
    from unclip_jax.images import write_image
    image = str(tmp_path / "in.png")
    write_image(np.random.default_rng(0).uniform(-1, 1, (20, 20, 3)), image)
    out = str(tmp_path / "var")
    flags = ["--num", "2", "--decoder_steps=karlo3", "--upsampler_steps=karlo2"]
    res = sample.run(["variations", "--workdir", workdir, "--image", image, "--out", out,
                      *flags])
    imgs = res["images"]
    assert imgs.shape == (2, 16, 16, 3)          # the upsamplers' resolution
    assert np.all(np.isfinite(imgs)) and np.abs(imgs).max() <= 1.0
    assert np.abs(imgs[0] - imgs[1]).max() > 1e-3   # eta = 1: two different variations
    assert sorted(os.listdir(out)) == ["settings.json", "strip.png"]
    # The workdir, the image and --out on object storage: the same variations.
    paths.upload(image, f"{bucket}/in.png")
    remote = sample.run(["variations", "--workdir", gcs_workdir, "--image", f"{bucket}/in.png",
                         "--out", f"{bucket}/var", *flags])
    np.testing.assert_allclose(remote["images"], imgs, atol=1e-5)
    assert (epath.Path(f"{bucket}/var/strip.png").read_bytes()
            == open(os.path.join(out, "strip.png"), "rb").read())
    # Without the vision tower: one clear error naming what is missing and how to add it.
    bare = str(tmp_path / "bare")
    shutil.copytree(workdir, bare)
    shutil.rmtree(os.path.join(bare, "image_encoder"))
    with open(os.path.join(bare, karlo.WORKDIR_FILE)) as f:
        meta = json.load(f)
    del meta["configs"]["image_encoder"]
    with open(os.path.join(bare, karlo.WORKDIR_FILE), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="no image encoder.*--image_encoder"):
        sample.run(["variations", "--workdir", bare, "--image", image, "--out",
                    str(tmp_path / "v2")])


def test_evaluate_takes_the_karlo_workdir(workdir, gcs_workdir, api, tmp_path):
    from unclip_jax.data import default_data_config
    from unclip_jax.eval import evaluator, plan
    from unclip_jax.eval.config import eval_config
    from unclip_jax.images import from_uint8

    pipe, _ = api
    c = eval_config(name="karlo", data=default_data_config("shapes"), save_images=True)
    c.protocol.num_samples = 2
    c.metrics.update(precision_recall=False)
    assert plan.sample_settings(c, workdir) == karlo.preset_settings(SampleSettings())
    assert plan.sample_settings(c, str(tmp_path)) == SampleSettings()   # not a Karlo workdir
    # The test's few steps (the compiled program of the tests above: one device, 2 rows).
    c.sampling.update(batch_size=2, preset="none", **{
        k: getattr(few_settings(), k) for k in ("prior_steps", "prior_guidance",
                                                "num_candidates", "decoder_steps",
                                                "decoder_guidance", "upsampler_steps")})
    c.num_devices = 1
    res = evaluator.evaluate(c, workdir, str(tmp_path / "eval"), log=lambda *_: None)
    assert res["num_samples"] == 2 and res["data"]["resolution"] == 16
    assert res["step"] == 0 and res["settings"]["decoder_guidance"] == 8.0
    with np.load(os.path.join(tmp_path / "eval", "samples.npz")) as f:
        s = {k: f[k] for k in f.files}
    # The generated images' embeddings are Karlo's vision tower's, and the CLIP score is
    # computed from them and the captions' Karlo z_t.
    gen = pipe.encode_images(from_uint8(s["images"]))
    np.testing.assert_allclose(s["gen_clip"], gen, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s["text_embedding"],
                               pipe.encode_text(list(s["caption"]))["text_embedding"],
                               rtol=1e-4, atol=1e-4)
    cos = (gen * s["text_embedding"]).sum(1) / (np.linalg.norm(gen, axis=1) * np.linalg.norm(
        s["text_embedding"], axis=1))
    assert res["metrics"]["clip_score"] == pytest.approx(100 * np.maximum(cos, 0).mean(),
                                                         abs=1e-3)
    assert s["prior_diffusion"].shape == (2, 16) and np.all(np.isfinite(s["prior_diffusion"]))
    # Folder data (captions.jsonl + images), local and on object storage, evaluated from the
    # local workdir and from its conversion to object storage (outputs there too): the same
    # metrics and images.
    from unclip_jax import paths
    from unclip_jax.data import shapes
    from unclip_jax.images import write_image
    folder = tmp_path / "folder"
    lines = []
    for i in range(2):
        _, caption, image = shapes.example(0, shapes.SPLIT_IDS["test"], i, size=16)
        write_image(from_uint8(image), str(folder / f"{i}.png"))
        lines.append(json.dumps({"file": f"{i}.png", "caption": caption}) + "\n")
    (folder / "captions.jsonl").write_text("".join(lines))
    paths.upload(str(folder), f"{gcs_workdir}_folder")
    c.data = default_data_config("folder")
    c.data.num_threads = 0
    c.metrics.shapes_accuracy = "false"
    runs = []
    for wd, data, out in ((workdir, str(folder), str(tmp_path / "eval_folder")),
                          (gcs_workdir, f"{gcs_workdir}_folder", f"{gcs_workdir}_eval")):
        c.data.path = data
        r = evaluator.evaluate(c, wd, out, log=lambda *_: None)
        with paths.np_load(f"{out}/samples.npz") as f:
            runs.append((r, {k: f[k] for k in f.files}))
    (local, ls), (remote, rs) = runs
    same = lambda x: json.dumps(x, sort_keys=True)  # noqa: E731 - NaN equals NaN here
    assert same(remote["metrics"]) == same(local["metrics"])
    assert list(ls["caption"]) == [json.loads(x)["caption"] for x in lines]
    for k in ("images", "gen_clip", "text_embedding"):
        np.testing.assert_array_equal(rs[k], ls[k], err_msg=k)
