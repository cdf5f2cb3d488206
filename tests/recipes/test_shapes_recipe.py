"""The main job end to end on a tiny version of experiments/shapes.py, then sampling from it."""
import json
import os

import numpy as np
import pytest

from unclip_jax import manipulate, sample
from unclip_jax.inference import Pipeline, SampleSettings, slerp
from unclip_jax.recipes.shapes import run_pipeline

from helpers.trainer import snapshot

FAST = SampleSettings(prior_steps="4", decoder_steps="4", upsampler_steps="ddim3")


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def pipe(run):
    return Pipeline.from_workdir(run[1])


def test_all_stages_trained_and_reported(run):
    cfg, wd, first = run
    for stage in ("clip", "diffusion_prior", "ar_prior", "decoder", "upsampler"):
        assert os.path.isdir(os.path.join(wd, stage, "checkpoints", "4")), stage
    assert os.path.exists(os.path.join(wd, "embed", "complete.json"))
    assert os.path.exists(os.path.join(wd, "samples", "grid.png"))
    report = json.load(open(os.path.join(wd, "report.json")))
    acc = report["accuracy"]
    assert acc["single_count"] == 4 and 0.0 <= acc["both_acc"] <= 1.0
    assert set(report["stages"]) >= {"clip", "decoder", "upsampler"}
    assert report["accuracy_ar_prior"]["single_count"] == 4
    assert os.path.exists(os.path.join(wd, "samples", "report_grid_ar.png"))
    md = open(os.path.join(wd, "report.md")).read()
    assert "| diffusion |" in md and "| AR |" in md and "true z_i" in md
    # No-prior rows: the same 4 prompts decoded from the true z_i of renders, and the renders
    # themselves, which the pixel check must read right (its ceiling).
    assert report["accuracy_true_embedding"]["single_count"] == 4
    ref = report["accuracy_rendered"]
    assert ref["single_count"] == 4 and ref["colour_acc"] == 1.0 and ref["shape_acc"] == 1.0
    # The upsampler-only row (renders at the decoder's size through the upsampler) and the shape
    # confusion tables: every single-object sample is counted once per table.
    assert report["accuracy_upsampled_render"]["single_count"] == 4
    for key in ("accuracy", "accuracy_true_embedding", "accuracy_upsampled_render"):
        conf = report[key]["shape_confusion"]
        assert sum(sum(row.values()) for row in conf.values()) == 4
        assert sum(conf[s][s] for s in conf) == report[key]["shape_count"]
    assert "upsampled |" in md and "| diffusion prior | circle |" in md
    assert os.path.exists(os.path.join(wd, "samples", "report_grid_true_z.png"))
    # The two-object and position prompts of the :smoke config, one each, 2 samples.
    assert report["accuracy_binding"]["two_count"] == 2
    assert report["accuracy_position"]["positions_named_count"] == 2
    assert list(report["prompt_checks"]) == ["a red square and a green circle",
                                             "a blue circle on the left"]
    assert "| a red square and a green circle |" in md and "| all |" in md
    assert os.path.exists(os.path.join(wd, "samples", "report_grid_binding.png"))
    # The priors' baseline is cos(z_t, z_i) of the cache's test split, computed here directly.
    from unclip_jax.data import cache
    zi = np.asarray(cache.load_field(os.path.join(wd, "embed"), "test", "image_embedding"))
    zt = np.asarray(cache.load_field(os.path.join(wd, "embed"), "test", "text_embedding"))
    cos = (zi * zt).sum(1) / np.linalg.norm(zi, axis=1) / np.linalg.norm(zt, axis=1)
    for name in ("diffusion", "ar"):
        p = report["prior_cosines"][name]
        assert p["n"] == len(zi) == 64
        assert p["cos_text_true"] == pytest.approx(cos.mean(), abs=1e-5)
        assert -1.0 <= p["cos_sample_true"] <= 1.0


def test_rerun_resumes_without_retraining(run, tmp_path):
    import shutil
    cfg, shared, first = run
    # On a copy (mtimes kept): the shared workdir is read by other tests, maybe at this moment.
    wd = str(tmp_path / "copy")
    shutil.copytree(shared, wd)
    ckpts = {s: sorted(os.listdir(os.path.join(wd, s, "checkpoints")))
             for s in ("clip", "decoder", "upsampler")}
    before = {p: (size, mtime) for p, size, mtime in snapshot(wd)
              if "/checkpoints/" in p or p.startswith(("embed/", "samples/", "report"))}
    second = run_pipeline(cfg, wd)
    after = {p: (size, mtime) for p, size, mtime in snapshot(wd) if p in before}
    assert after == before  # nothing trained, embedded, sampled or reported again
    assert second["timings"] == first["timings"]
    assert {s: sorted(os.listdir(os.path.join(wd, s, "checkpoints"))) for s in ckpts} == ckpts


def test_text_to_image_shapes_and_range(pipe):
    out = pipe.text_to_image(["a red circle", "a blue square", "a green triangle"], seed=0,
                             settings=FAST)
    assert out["images"].shape == (3, 64, 64, 3)
    assert out["decoder_images"].shape == (3, 32, 32, 3)
    assert np.all(np.abs(out["images"]) <= 1.0) and np.isfinite(out["images"]).all()
    assert out["image_embedding"].shape == (3, 16)
    # Same seed, same images (the compiled path is deterministic); another seed differs.
    again = pipe.text_to_image(["a red circle", "a blue square", "a green triangle"], seed=0,
                               settings=FAST)
    np.testing.assert_array_equal(again["images"], out["images"])
    other = pipe.text_to_image(["a red circle", "a blue square", "a green triangle"], seed=1,
                               settings=FAST)
    assert np.abs(other["images"] - out["images"]).max() > 1e-3
    ar = pipe.text_to_image(["a red circle"], seed=0, settings=SampleSettings(
        prior="ar", decoder_steps="4", upsampler_steps="ddim3"))
    assert ar["images"].shape == (1, 64, 64, 3)


def test_text_diff_at_zero_is_the_reconstruction(pipe):
    img = pipe.text_to_image(["a red circle"], settings=FAST)["decoder_images"][0]
    z, x_T = manipulate.invert(pipe, img, FAST)
    recon = pipe.decode(z, x_T=x_T, settings=manipulate._ddim(FAST))
    # theta moves the embedding that is decoded along the caption difference. (Checked on the
    # embeddings the decoder receives: a 4-step tiny decoder barely responds to z_i yet.)
    seen = []

    def spy(zs, **kw):
        seen.append(np.asarray(zs))
        return decode(zs, **kw)

    decode, pipe.decode = pipe.decode, spy
    try:
        diff = manipulate.text_diff(pipe, img, "a red circle", "a blue circle", [0.0, 0.5],
                                    settings=FAST)
    finally:
        del pipe.decode     # back to the class's method
    np.testing.assert_allclose(diff[0], recon[0], atol=1e-4)
    zt = pipe.encode_text(["a red circle", "a blue circle"])["text_embedding"]
    d = (zt[1] - zt[0]) / np.linalg.norm(zt[1] - zt[0])
    want = np.asarray(slerp(np.asarray(z)[0], d, 0.5))
    np.testing.assert_allclose(seen[0][0], np.asarray(z)[0], atol=1e-5)
    np.testing.assert_allclose(seen[0][1], want, atol=1e-5)
    assert np.dot(seen[0][1], seen[0][0]) / (np.linalg.norm(seen[0][1]) *
                                             np.linalg.norm(seen[0][0])) < 0.99


def test_interpolation_endpoints_and_variations(pipe):
    imgs = pipe.text_to_image(["a red circle", "a blue square"], settings=FAST)["decoder_images"]
    strip = manipulate.interpolate(pipe, imgs[0], imgs[1], [0.0, 0.5, 1.0], settings=FAST,
                                   x_T_mode="slerp")
    za, xa = manipulate.invert(pipe, imgs[0], FAST)
    zb, xb = manipulate.invert(pipe, imgs[1], FAST)
    s = manipulate._ddim(FAST)
    np.testing.assert_allclose(strip[0], pipe.decode(za, x_T=xa, settings=s)[0], atol=1e-4)
    np.testing.assert_allclose(strip[2], pipe.decode(zb, x_T=xb, settings=s)[0], atol=1e-4)
    v0 = manipulate.variations(pipe, imgs[0], num=2, eta=0.0, settings=FAST)
    np.testing.assert_allclose(v0[0], v0[1], atol=1e-5)     # eta 0: the reconstruction, twice
    v1 = manipulate.variations(pipe, imgs[0], num=2, eta=1.0, settings=FAST)
    assert np.abs(v1[0] - v1[1]).max() > 1e-3               # eta > 0: different variations


def test_sample_cli_writes_images_and_leaves_workdir_alone(run, tmp_path):
    wd = run[1]
    before = snapshot(wd)
    out = tmp_path / "out"
    res = sample.run(["--workdir", wd, "--prompt", "a red circle", "--prompt", "a blue square",
                      "--num", "2", "--out", str(out), "--decoder_steps", "4", "--prior_steps",
                      "4", "--upsampler_steps", "ddim3"])
    assert res["images"].shape == (4, 64, 64, 3)
    files = sorted(os.listdir(out))
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "settings.json"]
    settings = json.load(open(out / "settings.json"))
    assert settings["files"][2]["prompt"] == "a blue square" and settings["decoder_steps"] == "4"
    from PIL import Image
    assert Image.open(out / "0000.png").size == (64, 64)
    res = sample.run(["variations", "--workdir", wd, "--image", str(out / "0000.png"), "--num",
                      "3", "--out", str(tmp_path / "var"), "--decoder_steps", "4",
                      "--upsampler_steps", "ddim3"])
    assert Image.open(tmp_path / "var" / "strip.png").size[0] == 3 * 66
    assert snapshot(wd) == before


@pytest.mark.parametrize("args,match", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompts_file", "/nonexistent/prompts.txt"], "prompts file /nonexistent"),
    (["--prompt", "a red circle", "--prior", "ar", "--workdir", "/nonexistent/wd"],
     "does not exist"),
    (["--prompt", "a red circle", "--prior_var_type", "analytic"],   # never estimated here
     "no statistic file .*diffusion_prior/analytic_variance.json"),
])
def test_sample_cli_bad_input(run, tmp_path, args, match):
    wd = run[1]
    before = snapshot(wd)
    base = ["--workdir", wd, "--out", str(tmp_path / "o")]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        sample.run(base + args)
    assert snapshot(wd) == before


@pytest.mark.parametrize("args,match", [
    (["bogus"], "unknown command 'bogus'"),
    (["variations", "--prompt", "a red circle", "--image", "x.png"],
     "--prompt is not a flag of the variations command"),
    (["textdiff", "--image", "x.png", "--caption_from", "a red circle"],
     "the textdiff command needs --caption_to"),
    (["--prompt", "a red circle", "--decoder-steps", "4"], "decoder-steps"),
    (["text", "variations"], "one command at most"),
])
def test_sample_cli_rejects_bad_commands_before_loading(tmp_path, args, match):
    """The command word and its flags are checked before any model is read."""
    with pytest.raises(ValueError, match=match):
        sample.run(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")] + args)
    assert not (tmp_path / "o").exists()


def test_missing_stage_and_bad_image(run, tmp_path):
    import shutil
    wd = run[1]
    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(wd, "clip"), partial / "clip")
    with pytest.raises(FileNotFoundError, match="no trained 'decoder' stage"):
        Pipeline.from_workdir(str(partial))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot be read"):
        sample.run(["variations", "--workdir", wd, "--image", str(bad), "--out",
                    str(tmp_path / "o")])


def test_long_prompt_is_truncated_with_a_warning(pipe):
    long = "a red circle " + " ".join(["and a blue square"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        tokens, _ = pipe.tokenize([long])
    assert tokens.shape == (1, 24)


def test_mesh_sharded_pipeline_matches_single_device(run, pipe):
    from unclip_jax.inference import default_mesh
    sharded = Pipeline.from_workdir(run[1], mesh=default_mesh())
    assert sharded.mesh.devices.size == 8
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"] * 2
    a = pipe.text_to_image(prompts, settings=FAST)["images"]
    b = sharded.text_to_image(prompts, settings=FAST)["images"]
    np.testing.assert_allclose(a, b, atol=2e-4)
    # A batch that doesn't divide over the devices is padded, and only its rows come back.
    assert sharded.text_to_image(prompts[:3], settings=FAST)["images"].shape == (3, 64, 64, 3)


def test_half_written_checkpoint_is_a_clear_error(run, tmp_path):
    import shutil
    wd = tmp_path / "copy"
    shutil.copytree(run[1], wd, ignore=shutil.ignore_patterns("embed", "samples"))
    state = wd / "decoder" / "checkpoints" / "4" / "state"
    for r, _, files in os.walk(state):
        for f in files:
            if not f.startswith("_") and not f.endswith(".json"):
                open(os.path.join(r, f), "wb").close()
    before = snapshot(wd)
    with pytest.raises(RuntimeError, match="could be loaded"):
        Pipeline.from_workdir(str(wd))
    assert snapshot(wd) == before


def test_unknown_shapes_variant_is_an_error():
    """A misspelt variant (or the retired :long) fails naming it, instead of silently running
    the default."""
    from helpers.trainer import load_config
    for bad in ("lng", "long"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            load_config("shapes.py", bad)
    assert load_config("shapes.py", "smoke").stages.decoder.train.num_steps == 4
