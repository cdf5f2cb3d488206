"""decoder / upsampler stages: batches (cache columns or stand-ins), losses, crops, validation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.models import decoder_model_config, upsampler_model_config
from unclip_jax.stages import get_stage
from unclip_jax.stages.decoder import byte_tokenize, decoder_batch, pixel_image_embedding
from unclip_jax.stages.decoder import diffusion_config as decoder_diffusion_config
from unclip_jax.stages.upsampler import conditioning, random_crops
from unclip_jax.stages.upsampler import diffusion_config as upsampler_diffusion_config


def decoder_config(**model):
    c = base_config()
    c.stage = "decoder"
    m = dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(8,), head_channels=16, norm_groups=8, clip_dim=16,
             text_vocab=264, text_ctx=12, text_width=32, text_depth=1, text_heads=2)
    m.update(model)
    c.model = decoder_model_config(**m)
    c.data = default_data_config("shapes")
    c.data.resolution = 16
    c.diffusion = decoder_diffusion_config(schedule="cosine", num_timesteps=1000,
                                           vlb_weight=0.001, drop_image_emb=0.1, drop_text=0.5)
    return c


def upsampler_config(**diff):
    c = base_config()
    c.stage = "upsampler"
    c.model = upsampler_model_config(image_size=32, low_res_size=16, base_channels=16,
                                     channel_mult=(1, 2), norm_groups=8)
    c.data = default_data_config("shapes")
    c.data.resolution = 32
    c.diffusion = upsampler_diffusion_config(schedule="linear", num_timesteps=1000,
                                             degrade="bsr", crop_fraction=0.5)
    c.diffusion.update(diff)
    return c


def test_decoder_batches_use_cache_columns_or_documented_stand_ins():
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    caps = np.array(["a red square", "é", ""], dtype=object)
    cfg = decoder_config(image_emb_scale=2.0)
    stand = decoder_batch(cfg, {"image": img, "caption": caps})
    assert set(stand) == {"image", "image_emb", "tokens", "token_mask"}   # no strings
    np.testing.assert_allclose(np.linalg.norm(stand["image_emb"], axis=-1), 2.0, rtol=1e-5)
    np.testing.assert_allclose(stand["image_emb"], 2 * pixel_image_embedding(img, 16))
    assert stand["tokens"][0, :5].tolist() == [ord(ch) + 1 for ch in "a red"]
    assert stand["token_mask"].sum(1).tolist() == [12, 2, 0]      # truncated, 2 UTF-8 bytes, empty
    # The stand-in embedding depends on the image (layout/colour), deterministically.
    flip = pixel_image_embedding(-img[:1], 16)
    assert np.abs(pixel_image_embedding(img[:1], 16) - flip).max() > 0.1

    cached = {"image": img, "caption": caps, "image_embedding": rng.standard_normal((3, 16)),
              "tokens": np.array([[5, 6, 0], [7, 0, 0], [0, 0, 0]], np.int32)}
    out = decoder_batch(cfg, cached)
    np.testing.assert_allclose(out["image_emb"], 2 * cached["image_embedding"], rtol=1e-6)
    assert out["tokens"].shape == (3, 12) and out["token_mask"].sum(1).tolist() == [2, 1, 0]
    cfg.model.image_emb_source = "cache"
    with pytest.raises(ValueError, match="image_emb_source"):
        decoder_batch(cfg, {"image": img, "caption": caps})
    assert byte_tokenize(["ab"], 4)[0].tolist() == [[98, 99, 0, 0]]


def test_decoder_stage_loss_is_hybrid_and_trains_every_branch():
    cfg = decoder_config()
    stage = get_stage("decoder")
    stage.validate(cfg)
    model = stage.build_model(cfg)
    batch = {k: jnp.asarray(v) for k, v in stage.example_batch(cfg, 4).items()}
    assert batch["image"].shape == (4, 16, 16, 3) and batch["tokens"].dtype == jnp.int32
    params = nn.unbox(jax.jit(lambda r: stage.init(model, r, batch))(
        jax.random.key(0))["params"])
    batch["image"] = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)
    batch["image_emb"] = jax.random.normal(jax.random.key(2), (4, 16))
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: stage.loss(model, p, batch, jax.random.key(3), cfg), has_aux=True))(params)
    assert np.isfinite(float(loss)) and set(metrics) >= {"mse", "vlb", "loss"}
    # hybrid: loss = mse + 0.001 * T * vlb; a fresh model predicts eps = 0, so mse ~ 1.
    np.testing.assert_allclose(loss, metrics["mse"] + metrics["vlb"], rtol=1e-5)
    assert 0.5 < float(metrics["mse"]) < 1.5
    gn = jax.jit(lambda g: {k: optax_norm(v) for k, v in g.items()}    # one program, not one
                 | {"conv_out": optax_norm(g["unet"]["conv_out"])})(grads)  # per parameter shape
    assert float(gn["unet"]) > 0
    # The output conv is zero-initialised, so only it gets gradient on the first step.
    assert float(gn["conv_out"]) > 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(tree)))


def test_upsampler_crops_are_aligned_and_conditioning_is_degraded():
    yy, xx = jnp.meshgrid(jnp.arange(32.0), jnp.arange(32.0), indexing="ij")
    coords = jnp.broadcast_to(jnp.stack([yy, xx, yy + xx], -1), (5, 32, 32, 3))
    a, b = random_crops(jax.random.key(0), 8, coords, coords * 2)
    np.testing.assert_array_equal(b, 2 * a)                       # same place in both images
    assert a.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(a[:, 1:, :, 0] - a[:, :-1, :, 0], 1.0)   # contiguous patch
    assert len({(int(p[0, 0, 0]), int(p[0, 0, 1])) for p in a}) > 1       # per-example offsets
    cfg = upsampler_config(degrade="blur")
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    cond = conditioning(cfg, jax.random.key(2), x)
    assert cond.shape == x.shape
    # A low-res (16px) blurred version: much smoother than x.
    tv = lambda im: float(jnp.abs(im[:, 1:] - im[:, :-1]).mean())  # noqa: E731
    assert tv(cond) < 0.3 * tv(x)


def test_upsampler_stage_loss_on_crops():
    cfg = upsampler_config()
    stage = get_stage("upsampler")
    stage.validate(cfg)
    model = stage.build_model(cfg)
    batch = {"image": jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)}
    params = nn.unbox(jax.jit(lambda r: stage.init(model, r, batch))(
        jax.random.key(0))["params"])
    loss, metrics = jax.jit(lambda p, r: stage.loss(model, p, batch, r, cfg))(
        params, jax.random.key(4))
    assert 0.5 < float(loss) < 1.5 and "vlb" not in metrics   # fixed variance, eps MSE


def test_stage_validation_names_bad_fields():
    dec, up = get_stage("decoder"), get_stage("upsampler")
    bad = [
        (dec, decoder_config(image_size=32), "config.data.resolution"),
        (dec, decoder_config(text_vocab=100), "config.model.text_vocab"),
        (dec, decoder_config(tokens_source="gpt2"), "config.model.tokens_source"),
        (up, upsampler_config(crop_fraction=0.35), "config.diffusion.crop_fraction"),
        (up, upsampler_config(degrade="jpeg"), "config.diffusion.degrade"),
        (up, upsampler_config(schedule="sigmoid"), "config.diffusion.schedule"),
    ]
    for stage, cfg, field in bad:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            stage.validate(cfg)
    c = decoder_config()
    c.diffusion.drop_text = 1.5
    with pytest.raises(ValueError, match="drop_text"):
        dec.validate(c)
    assert isinstance(c.diffusion, ml_collections.ConfigDict)
