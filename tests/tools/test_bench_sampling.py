"""The sampling benchmark's figures are computed from its own timings and are consistent."""
import math

import pytest

from unclip_jax.tools import bench_sampling

from helpers.trainer import load_config


# Smaller models than the configs' (fewer layers to trace and compile, smaller images to run):
# the figures' arithmetic and the guided batch doubling do not depend on the model's size.
@pytest.mark.parametrize("name,arg,guided,model", [
    ("decoder_shapes.py", "smoke", True, dict(image_size=16, channel_mult=(1,), text_ctx=8)),
    ("upsampler_shapes.py", "smoke", False,
     dict(image_size=32, low_res_size=16, channel_mult=(1,))),
    ("prior_shapes.py", None, True, dict(width=32, depth=1, heads=2, embed_dim=16, text_ctx=8,
                                         text_dim=16))])
def test_sampling_overhead_and_throughput(name, arg, guided, model):
    cfg = load_config(name, arg)
    cfg.model.update(model)
    cfg.train.init_prng = "rbg"   # the init program compiles ~3x faster than threefry's
    r = bench_sampling.benchmark_sampling(cfg, steps=3, batch=2, repeats=1)
    assert r["stage"] == cfg.stage and r["guided"] is guided
    assert r["model_batch"] == (4 if guided else 2)
    assert r["loop_s"] > 0 and r["model_call_s"] > 0
    assert math.isfinite(r["overhead"]) and r["overhead"] > 0
    assert r["overhead"] == pytest.approx(r["loop_s"] / (3 * r["model_call_s"]))
    assert r["images_per_s"] == pytest.approx(2 / r["loop_s"])
    assert r["s_per_image"] == pytest.approx(r["loop_s"] / 2)


def test_unsupported_stage_is_named():
    cfg = load_config("toy.py")
    with pytest.raises(ValueError, match="toy"):
        bench_sampling.stage_sampler(cfg, steps=2, batch=1)


def test_ar_prior_cache_speedup_figures():
    cfg = load_config("ar_prior_shapes.py")
    with cfg.unlocked():
        cfg.model.update(pca_components=7, num_buckets=32, text_ctx=8, text_dim=16, enc_width=32,
                         enc_depth=1, enc_heads=2, dec_width=32, dec_depth=2, dec_heads=2)
    r = bench_sampling.benchmark_ar_sampling(cfg, batch=2, guidance=1.5, repeats=1)
    assert r["tokens"] == 8 and r["guided"] and r["model_batch"] == 4
    assert r["same_tokens"]   # the cache changes the cost, not the tokens
    assert r["speedup"] == pytest.approx(r["uncached_s"] / r["cached_s"])
    assert r["tokens_per_s_cached"] == pytest.approx(2 * 8 / r["cached_s"])
    assert r["caption_encoder_s"] > 0 and r["params"] > 0
    assert "speed-up" in bench_sampling.format_ar_result(r)
