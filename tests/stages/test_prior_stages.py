"""Both prior stages and the clip stage run in the generic trainer on a data/fsdp/tensor mesh."""
import json
import os

import numpy as np
from helpers.trainer import load_config

from unclip_jax.train.trainer import train


def _small(c, tmp_path, steps=6):
    c.train.update(num_steps=steps, batch_size=16, log_every=2, ckpt_every=100,
                   async_checkpoint=False, init_prng="rbg")  # init compiles faster than threefry
    c.mesh.update(data=2, fsdp=2, tensor=2)
    c.optim.update(warmup_steps=0, lr=1e-3)
    return c


def test_diffusion_prior_stage_trains_sharded(tmp_path):
    c = _small(load_config("prior_shapes.py", "synthetic"), tmp_path)
    c.model.update(width=32, depth=1, heads=2, embed_dim=16, text_ctx=8)
    # the paper's variance: its statistic is estimated from the final EMA weights (sharded)
    c.diffusion.update(var_type="analytic", analytic_examples=24, num_timesteps=100)
    out = train(c, str(tmp_path / "dp"))
    assert out["step"] == 6 and np.isfinite(out["metrics"]["loss"])
    stat = tmp_path / "dp" / "analytic_variance.json"
    rec = json.loads(stat.read_text())
    assert rec["complete"] and rec["step"] == 6 and rec["num_examples"] == 32  # 2 batches
    eps = np.asarray(rec["eps_sq_norm"])
    assert eps.shape == (100,) and np.all(np.isfinite(eps)) and np.all(eps > 0)
    # unit embeddings x 8 (prior_shapes' scale) in 16 dims: per-dimension variance near 4
    assert 1.0 < rec["x0_var"] < 4.5
    before = stat.read_bytes()
    again = train(c, str(tmp_path / "dp"))   # a rerun: nothing to train, the statistic checked
    assert again["resumed_from"] == 6 and stat.read_bytes() == before


def test_ar_prior_stage_trains_sharded(tmp_path):
    c = _small(load_config("ar_prior_shapes.py", "synthetic"), tmp_path)
    c.model.update(enc_width=32, enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1,
                   dec_heads=2, embed_dim=16, pca_components=6, num_buckets=32, text_ctx=8,
                   codec_path=str(tmp_path / "codec.npz"))
    out = train(c, str(tmp_path / "ar"))
    assert out["step"] == 6 and os.path.exists(tmp_path / "codec.npz")
    assert out["metrics"]["loss"] < np.log(32) + 0.5  # cross-entropy over 32 buckets


def test_clip_stage_trains_on_shapes(tmp_path):
    c = _small(load_config("clip_shapes.py"), tmp_path, steps=4)
    c.model.update(embed_dim=16, image_size=32, patch=8, vision_width=32, vision_depth=1,
                   vision_heads=2, text_ctx=16, text_width=32, text_depth=1, text_heads=2,
                   vocab_size=128)
    c.data.update(resolution=32, data_dir=str(tmp_path / "tfds"), num_threads=0)
    c.data.shapes.update(num_train=64, num_test=16, image_size=32)
    c.tokenizer.update(dir=str(tmp_path / "tok"), num_captions=64)
    out = train(c, str(tmp_path / "clip"))
    assert out["step"] == 4 and np.isfinite(out["metrics"]["loss"])
    assert os.path.exists(tmp_path / "tok" / "tokenizer.json")
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0
