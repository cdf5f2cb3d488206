"""The `upsampler` stage: unCLIP's convolution-only super-resolution U-Nets (64->256, 256->1024).

Per step, on device: the low-res conditioning image is made from the batch image by an
antialiased downscale to `config.model.low_res_size`, corrupted (`config.diffusion.degrade`:
"blur" for 64->256, "bsr" for 256->1024, "none"), resized back up; then a random square crop of
`config.diffusion.crop_fraction` x the target side (0.25 in the paper) is taken at the same place
from the image and the upsampled condition. Objective: eps (or v, x0) MSE with fixed variance
(the paper samples these with DDIM). The model is fully convolutional, so the trained params
apply to full-size images.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion
from unclip_jax.data.degrade import degrade, resize
from unclip_jax.models import model_from_config
from unclip_jax.stages.base import Stage
from unclip_jax.stages.decoder import noised, unet_diffusion_config, validate_diffusion

DEGRADE = ("none", "blur", "bsr")


def diffusion_config(**kw):
    """`config.diffusion` of the upsampler stage."""
    return unet_diffusion_config(**dict(dict(
        degrade="none",             # corruption of the low-res condition: DEGRADE
        crop_fraction=1.0,          # training crops, as a fraction of the target side
    ), **kw))


def crop_size(config) -> int:
    return int(round(int(config.model.image_size) * float(config.diffusion.crop_fraction)))


def random_crops(rng, size: int, *images):
    """The same random size x size crop (per example) of each NHWC image."""
    b, h, w = images[0].shape[:3]
    ky, kx = jax.random.split(rng)
    oy = jax.random.randint(ky, (b,), 0, h - size + 1)
    ox = jax.random.randint(kx, (b,), 0, w - size + 1)
    crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(
        im, (y, x, 0), (size, size, im.shape[-1])))
    return tuple(crop(im, oy, ox) for im in images)


def conditioning(config, rng, x_hi):
    """Corrupted low-res image, resized back to x_hi's size (what the model sees)."""
    low = resize(x_hi, int(config.model.low_res_size))
    low = degrade(rng, low, str(config.diffusion.degrade))
    return jax.image.resize(low, x_hi.shape, "linear")


class UpsamplerStage(Stage):
    name = "upsampler"

    def validate(self, config):
        m, d = config.model, config.diffusion
        if m.kind != "upsampler":
            raise ValueError("config.model.kind must be 'upsampler' for the upsampler stage")
        if int(config.data.resolution) != int(m.image_size):
            raise ValueError(f"config.data.resolution={config.data.resolution} must equal "
                             f"config.model.image_size={m.image_size} (the target size)")
        if not 0 < int(m.low_res_size) < int(m.image_size):
            raise ValueError("config.model.low_res_size must be positive and below image_size")
        if str(d.degrade) not in DEGRADE:
            raise ValueError(f"config.diffusion.degrade must be one of {DEGRADE}")
        c, levels = crop_size(config), len(m.channel_mult) - 1
        if not 0 < c <= int(m.image_size) or c % (2 ** levels):
            raise ValueError(f"config.diffusion.crop_fraction gives {c}px crops; they must be in "
                             f"(0, image_size] and divisible by 2**{levels} (U-Net levels)")
        if bool(m.learn_sigma):
            raise ValueError("config.model.learn_sigma: the upsamplers use fixed variance")
        validate_diffusion(config)
        model_from_config(m)

    def build_model(self, config):
        return model_from_config(config.model)

    def example_batch(self, config, batch_size):
        s = int(config.model.image_size)
        return {"image": np.zeros((batch_size, s, s, 3), np.float32)}

    def init(self, model, rng, batch):
        x = jnp.asarray(batch["image"])
        t = jnp.zeros((x.shape[0],), jnp.int32)
        return model.init({"params": rng}, x, t, x)

    def loss(self, model, params, batch, rng, config):
        x_hi = batch["image"].astype(jnp.float32)
        k_deg, k_crop, k_diff, k_drop = jax.random.split(rng, 4)
        cond = conditioning(config, k_deg, x_hi)
        x0, cond = random_crops(k_crop, crop_size(config), x_hi, cond)
        schedule, t, noise, x_t = noised(config, k_diff, x0)
        out = model.apply({"params": params}, x_t, t, cond, train=True, rngs={"dropout": k_drop})
        d = config.diffusion
        per_ex, terms = diffusion.diffusion_loss(
            schedule, out, x0, x_t, t, noise, parameterization=str(d.parameterization),
            learned_variance=False, min_snr_gamma=float(d.min_snr_gamma))
        return jnp.mean(per_ex), {k: jnp.mean(v) for k, v in terms.items()}

    def make_data(self, config, *, split, process_index, process_count, local_batch_size, seed):
        from unclip_jax.data import make_iterator
        return make_iterator(config.data, split=split, process_index=process_index,
                             process_count=process_count, local_batch_size=local_batch_size,
                             seed=seed, fields=("image",))

