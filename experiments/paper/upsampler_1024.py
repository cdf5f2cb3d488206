"""unCLIP upsampler 256 -> 1024, paper scale (Table 3 of Ramesh et al. 2022).

Run (accelerators), on img2dataset webdataset shards (images only are read; a folder with
captions.jsonl works too: --config.data.name=folder --config.data.path=DIR):
  python -m unclip_jax.main --config=experiments/paper/upsampler_1024.py --workdir=runs/up1024 \
      --config.data.path='/data/web/{split}/*.tar'
Smoke (CPU, no input): --config=experiments/paper/upsampler_1024.py:smoke --workdir=W writes
  128px webdataset shards under W/smoke_data (unclip_jax.stages.smoke), then trains 2 steps at
  tiny widths and 128px, with the paper's 4x ratio and 1/4 crops (32px low-res, 32px crops).
Table 3: linear schedule, T=1000, DDIM sampling with 15 steps, base 192, channel mult
1,1,2,2,4,4, 2 res blocks, no attention (convolution only), no dropout listed, trained on random
crops of 1/4 of the target size (256x256 crops of 1024x1024 images) and applied at full size,
batch 512, 1M iterations, AdamW lr 1.0e-4, beta2 0.999, eps 1e-8, EMA 0.9999. Conditioning image
corrupted with the BSR-style degradation (unclip_jax/data/degrade.py). Timestep-only
conditioning, fixed variance.

Parameter count (jax.eval_shape, tests/models/test_unet_paper.py): ~282M against the paper's 300M (-6%):
the ADM layout as is.
"""
import ml_collections

from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.models import upsampler_model_config
from unclip_jax.stages.smoke import smoke_variant
from unclip_jax.stages.upsampler import diffusion_config


def get_config(arg=None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"experiments/paper/upsampler_1024.py: unknown variant {arg!r} (use :smoke)")
    c = base_config()
    c.stage = "upsampler"
    c.model = upsampler_model_config(
        dtype="bfloat16", param_dtype="float32", remat=True,
        image_size=1024, low_res_size=256, base_channels=192, channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2, attention_resolutions=(), norm_groups=32, dropout=0.0)
    c.data = default_data_config("webdataset")   # data.path: the shards' glob
    c.data.resolution = 1024
    c.diffusion = diffusion_config(
        schedule="linear", num_timesteps=1000, parameterization="eps", degrade="bsr",
        crop_fraction=0.25, sampling_steps="ddim15")
    c.train.update(batch_size=512, num_steps=1_000_000, log_every=100, ckpt_every=5000)
    c.optim.update(lr=1.0e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, ema_decay=0.9999,
                   warmup_steps=10_000, schedule="constant", grad_clip=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    # Ahead-of-time plan (python -m unclip_jax.tools.aot --config=THIS): 64 v5p chips, all fsdp,
    # 8 crops per chip, bf16 compute, res blocks rematerialised.
    c.aot = ml_collections.ConfigDict(dict(topology="v5p:4x4x4"))
    if arg == "smoke":
        # Two levels, not the paper's 6: XLA's compile time grows with every level.
        c.model.update(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
        # 128px targets, not 1024: the same wiring (4x, 1/4 crops) on smaller images.
        c.model.update(image_size=128, low_res_size=32)
        c.data.resolution = 128
        smoke_variant(c, image_size=128, num_examples=16)
    return c
