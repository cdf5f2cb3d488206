"""unCLIP-style upsampler 32 -> 64 on the built-in shapes dataset, sized for a 2-core CPU.

Run:   python -m unclip_jax.main --config=experiments/upsampler_shapes.py --workdir=runs/up
Quick: --config=experiments/upsampler_shapes.py:smoke  (tiny model, 200 steps, smoke test)
As the paper's first upsampler: convolution only, timestep-only conditioning, the low-res image
blurred (kernel 3, sigma 0.6) at train time; trained on random 32x32 crops of 64x64 images
(crop_fraction 0.5 here, 0.25 in the paper) and applied at full size. Set diffusion.degrade="bsr"
for the second stage's degradation.
Reach: eps MSE ~0.84 at step 50, ~0.13 at 150, ~0.06 at 300; below ~0.05 by 1000 steps.
"""
from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.models import upsampler_model_config
from unclip_jax.stages.upsampler import diffusion_config


def get_config(arg=None):
    c = base_config()
    c.stage = "upsampler"
    c.model = upsampler_model_config(
        image_size=64, low_res_size=32, base_channels=32, channel_mult=(1, 2, 2),
        num_res_blocks=1, norm_groups=8, dropout=0.0)
    c.data = default_data_config("shapes")
    c.data.resolution = 64
    c.data.num_threads = 2
    c.diffusion = diffusion_config(
        schedule="cosine", num_timesteps=1000, parameterization="eps", degrade="blur",
        crop_fraction=0.5)
    c.train.update(batch_size=16, num_steps=1000, log_every=50, ckpt_every=500)
    c.optim.update(lr=3e-4, warmup_steps=100, schedule="constant", ema_decay=0.999)
    if arg == "smoke":
        c.model.update(base_channels=16, channel_mult=(1, 2))
        c.train.update(batch_size=8, num_steps=200, log_every=20, ckpt_every=100)
    return c
