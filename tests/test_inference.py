"""Pipeline: the 64->256->1024 shape of the paper's chain of two upsamplers, at tiny widths.

The tiny main job's CLIP, prior and 32x32 decoder feed two untrained 4x upsamplers (32->128 and
128->512, random weights): the chain must run both, in order, through the Python API and the
sample CLI, and refuse them out of order.
"""
import json
import os

import numpy as np
import pytest

from unclip_jax import sample
from unclip_jax.inference import Pipeline, SampleSettings

from helpers.trainer import load_config, save_untrained


@pytest.fixture(scope="module")
def chained(tiny_run, tmp_path_factory):
    """A workdir with the tiny run's clip, diffusion prior and decoder, and upsampler_128 and
    upsampler_512 (names whose numeric order is the chain's)."""
    wd = tmp_path_factory.mktemp("chain")
    for stage in ("clip", "diffusion_prior", "decoder"):
        os.symlink(os.path.join(tiny_run[1], stage), wd / stage)
    for low, size in ((32, 128), (128, 512)):
        c = load_config("upsampler_shapes.py", "smoke")
        c.model.update(image_size=size, low_res_size=low, base_channels=8, channel_mult=(1,),
                       norm_groups=4)
        save_untrained(c, str(wd / f"upsampler_{size}"), seed=size)
    return str(wd)


def test_two_upsamplers_chain_to_16x_through_api_and_cli(chained, tmp_path):
    # One compiled text -> image program: the CLI's (Pipeline.from_workdir + text_to_image with
    # the listed chain); the API's own discovery finds the same chain in the same order.
    pipe = Pipeline.from_workdir(chained)
    assert [os.path.basename(u.workdir) for u in pipe.upsamplers] == ["upsampler_128",
                                                                      "upsampler_512"]
    res = sample.run(["--workdir", chained, "--prompt", "a red circle", "--out",
                      str(tmp_path / "o"), "--prior_steps", "4", "--decoder_steps", "4",
                      "--upsamplers", "upsampler_128,upsampler_512",
                      "--upsampler_steps", "ddim2", "--upsampler_steps", "ddim3"])
    images = res["images"]
    assert images.shape == (1, 512, 512, 3)   # 32 x 4 x 4
    assert np.all(np.isfinite(images)) and np.abs(images).max() <= 1.0
    assert images.std() > 1e-3                # not a constant image
    rec = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert rec["upsampler_steps"] == ["ddim2", "ddim3"]
    assert [os.path.basename(u) for u in rec["upsamplers"]] == ["upsampler_128", "upsampler_512"]


def test_upsamplers_out_of_order_or_miscounted_are_named(chained):
    with pytest.raises(ValueError, match="upsampler_512 takes 128x128 images but the stage "
                                         "before it makes 32x32"):
        Pipeline.from_workdir(chained, upsamplers=["upsampler_512", "upsampler_128"])
    with pytest.raises(FileNotFoundError, match="upsampler_256 has no checkpoints"):
        Pipeline.from_workdir(chained, upsamplers=["upsampler_256"])
    pipe = Pipeline.from_workdir(chained, upsamplers=["upsampler_128"])
    with pytest.raises(ValueError, match="3 respacings .* for 1 upsamplers"):
        pipe.upsample(np.zeros((1, 32, 32, 3), np.float32),
                      settings=SampleSettings(upsampler_steps=("ddim2", "ddim2", "ddim2")))
