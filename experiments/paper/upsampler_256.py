"""unCLIP upsampler 64 -> 256, paper scale (Table 3 of Ramesh et al. 2022).

Run (accelerators), on img2dataset webdataset shards (images only are read; a folder with
captions.jsonl works too: --config.data.name=folder --config.data.path=DIR):
  python -m unclip_jax.main --config=experiments/paper/upsampler_256.py --workdir=runs/up256 \
      --config.data.path='/data/web/{split}/*.tar'
Smoke (CPU, no input): --config=experiments/paper/upsampler_256.py:smoke --workdir=W writes
  256px webdataset shards under W/smoke_data (unclip_jax.stages.smoke), then trains 2 steps at
  tiny widths.
Table 3: cosine schedule, T=1000, DDIM sampling with 27 steps, base 320, channel mult 1,2,3,4,
3 res blocks, no attention (convolution only), dropout 0.1, trained on random crops of 1/4 of the
target size (64x64 crops of 256x256 images) and applied at full size, batch 1024, 1M iterations,
AdamW lr 1.2e-4, beta2 0.999, eps 1e-8, EMA 0.9999. Conditioning image corrupted with a gaussian
blur (kernel 3, sigma 0.6). Timestep-only conditioning (no z_i, no caption), fixed variance.

Parameter count (jax.eval_shape, tests/models/test_unet_paper.py): ~730M against the paper's 700M
(+4%): the ADM layout (BigGAN res-block resampling, 1x1 skips, AdaGN projections) as is.
"""
import ml_collections

from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.models import upsampler_model_config
from unclip_jax.stages.smoke import smoke_variant
from unclip_jax.stages.upsampler import diffusion_config


def get_config(arg=None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"experiments/paper/upsampler_256.py: unknown variant {arg!r} (use :smoke)")
    c = base_config()
    c.stage = "upsampler"
    c.model = upsampler_model_config(
        dtype="bfloat16", param_dtype="float32", remat=True,
        image_size=256, low_res_size=64, base_channels=320, channel_mult=(1, 2, 3, 4),
        num_res_blocks=3, attention_resolutions=(), norm_groups=32, dropout=0.1)
    c.data = default_data_config("webdataset")   # data.path: the shards' glob
    c.data.resolution = 256
    c.diffusion = diffusion_config(
        schedule="cosine", num_timesteps=1000, parameterization="eps", degrade="blur",
        crop_fraction=0.25, sampling_steps="ddim27")
    c.train.update(batch_size=1024, num_steps=1_000_000, log_every=100, ckpt_every=5000)
    c.optim.update(lr=1.2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, ema_decay=0.9999,
                   warmup_steps=10_000, schedule="constant", grad_clip=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    # Ahead-of-time plan (python -m unclip_jax.tools.aot --config=THIS): 64 v5p chips, all fsdp,
    # 16 crops per chip, bf16 compute, res blocks rematerialised.
    c.aot = ml_collections.ConfigDict(dict(topology="v5p:4x4x4"))
    if arg == "smoke":
        # Two levels, not the paper's 4: XLA's compile time grows with every level.
        c.model.update(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
        smoke_variant(c, image_size=256, num_examples=16)
    return c
