"""Paper-scale configs (Table 3): parameter counts via jax.eval_shape (nothing allocated)."""
import importlib

import jax
import numpy as np
import pytest

from unclip_jax.stages import get_stage

def load_config(name):
    return importlib.import_module(f"experiments.paper.{name}").get_config()


def count_params(config):
    stage = get_stage(config.stage)
    stage.validate(config)
    model = stage.build_model(config)
    batch = stage.example_batch(config, 1)
    shapes = jax.eval_shape(lambda: stage.init(model, jax.random.key(0), batch))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


@pytest.mark.parametrize("name,target,table", [
    ("decoder_64", 3.5e9, dict(base_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                               attention_resolutions=(32, 16, 8), head_channels=64,
                               text_ctx=256, text_width=2048, text_depth=24, text_heads=32,
                               dropout=0.1, learn_sigma=True)),
    ("upsampler_256", 700e6, dict(base_channels=320, channel_mult=(1, 2, 3, 4),
                                  num_res_blocks=3, attention_resolutions=(), low_res_size=64)),
    ("upsampler_1024", 300e6, dict(base_channels=192, channel_mult=(1, 1, 2, 2, 4, 4),
                                   num_res_blocks=2, attention_resolutions=(),
                                   low_res_size=256)),
])
def test_paper_config_matches_table3_and_parameter_count(name, target, table):
    config = load_config(name)
    for k, v in table.items():
        got = config.model[k]
        assert (tuple(got) if isinstance(v, tuple) else got) == v, (name, k, got)
    n = count_params(config)
    assert abs(n - target) / target < 0.10, f"{name}: {n / 1e6:.0f}M vs {target / 1e6:.0f}M"


def test_paper_training_hyperparameters():
    dec, up256, up1024 = (load_config(n) for n in ("decoder_64", "upsampler_256",
                                                   "upsampler_1024"))
    assert (dec.train.batch_size, up256.train.batch_size, up1024.train.batch_size) == (
        2048, 1024, 512)
    assert (dec.optim.lr, up256.optim.lr, up1024.optim.lr) == (1.2e-4, 1.2e-4, 1.0e-4)
    assert (dec.diffusion.schedule, up256.diffusion.schedule, up1024.diffusion.schedule) == (
        "cosine", "cosine", "linear")
    assert (up256.diffusion.crop_fraction, up1024.diffusion.crop_fraction) == (0.25, 0.25)
    assert (up256.diffusion.degrade, up1024.diffusion.degrade) == ("blur", "bsr")
    assert (dec.diffusion.drop_image_emb, dec.diffusion.drop_text) == (0.1, 0.5)
    assert all(c.optim.ema_decay == 0.9999 and c.optim.b2 == 0.999 for c in (dec, up256, up1024))
