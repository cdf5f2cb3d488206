"""Sampling from a converted tiny Karlo workdir through the CLI code path and the Python API."""
import json
import os

import numpy as np
import pytest

import jax

from helpers.karlo_pipeline import build_tiny_karlo
from unclip_jax import convert, karlo, parallel, sample
from unclip_jax.inference import Pipeline, SampleSettings

FEW = ["--prior_steps=karlo3", "--decoder_steps=karlo3", "--upsampler_steps=karlo2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("karlo_wd")
    src, _ = build_tiny_karlo(root)
    wd = str(root / "wd")
    convert.convert_karlo(src, wd)
    return wd


def test_preset_is_karlos_and_explicit_flags_win():
    s = karlo.preset_settings(SampleSettings(decoder_guidance=2.0), keep={"decoder_guidance"})
    assert (s.prior_steps, s.prior_guidance, s.decoder_steps, s.upsampler_steps) == (
        "karlo25", 4.0, "karlo25", "karlo7")
    assert s.decoder_guidance == 2.0 and s.num_candidates == 1


def test_text_to_image_through_cli_and_api(workdir, tmp_path):
    out = str(tmp_path / "out")
    # A Karlo workdir samples with Karlo's preset (no --preset needed); the step flags win.
    res = sample.run(["--workdir", workdir, "--prompt", "a red", "--prompt", "red",
                      "--out", out, *FEW])
    imgs = res["images"]
    assert imgs.shape == (2, 16, 16, 3)          # super_res_first/last's sample_size
    assert np.all(np.isfinite(imgs)) and np.abs(imgs).max() <= 1.0
    with open(os.path.join(out, "settings.json")) as f:
        rec = json.load(f)
    assert (rec["prior_guidance"], rec["decoder_guidance"], rec["prior_steps"]) == (
        4.0, 8.0, "karlo3")
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "settings.json"]
    pipe = Pipeline.from_workdir(workdir)
    assert isinstance(pipe, karlo.KarloPipeline)
    s = karlo.preset_settings(SampleSettings(prior_steps="karlo3", decoder_steps="karlo3",
                                             upsampler_steps="karlo2"),
                              keep={"prior_steps", "decoder_steps", "upsampler_steps"})
    api = pipe.text_to_image(["a red", "red"], seed=0, settings=s)
    # The same seed and settings give the CLI's images (one compiled program per batch).
    np.testing.assert_allclose(api["images"], imgs, atol=1e-5)
    assert api["decoder_images"].shape == (2, 8, 8, 3)
    other = pipe.text_to_image(["a red", "red"], seed=1, settings=s)
    assert np.abs(other["images"] - api["images"]).max() > 1e-3
    # Sharded over a 2-device mesh (batch split, weights replicated): the same images.
    mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
    sharded = Pipeline.from_workdir(workdir, mesh=mesh).text_to_image(["a red", "red"], seed=0,
                                                                       settings=s)
    np.testing.assert_allclose(sharded["images"], api["images"], atol=1e-4)
