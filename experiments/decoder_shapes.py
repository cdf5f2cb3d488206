"""unCLIP decoder at 32x32 on the built-in shapes dataset, sized for a 2-core CPU.

Run:   python -m unclip_jax.main --config=experiments/decoder_shapes.py --workdir=runs/dec
Quick: --config=experiments/decoder_shapes.py:smoke  (tiny model, 200 steps, smoke test)
Conditioning: no CLIP yet, so z_i is the "pixels" STAND-IN (a fixed random projection of the 8x8
image, see unclip_jax/stages/decoder.py) and the caption is byte-tokenised; with an embedding
cache (data.name="embed_cache") the cached CLIP columns are used instead (sources "auto").
Reach: hybrid loss (eps MSE + 0.001*T*VLB) ~0.88 at step 50, ~0.12 at 200, ~0.03 at 400 (vlb
term ~1e-3 bits/dim); it keeps falling slowly to 2000 steps.
"""
from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.models import decoder_model_config
from unclip_jax.stages.decoder import diffusion_config


def get_config(arg=None):
    c = base_config()
    c.stage = "decoder"
    c.model = decoder_model_config(
        image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(8,), head_channels=32, norm_groups=8, dropout=0.0,
        learn_sigma=True, clip_dim=64, clip_tokens=4, text_vocab=264, text_ctx=32,
        text_width=64, text_depth=2, text_heads=2, image_emb_scale=8.0)   # sqrt(clip_dim)
    c.data = default_data_config("shapes")
    c.data.resolution = 32
    c.data.shapes.image_size = 32
    c.data.num_threads = 2
    # min_snr_gamma > 0: min-SNR loss weighting (Hang et al. 2023); 5 gave no shape gain in the
    # shapes main job, so it stays off (the paper's plain MSE).
    c.diffusion = diffusion_config(
        schedule="cosine", num_timesteps=1000, parameterization="eps", vlb_weight=0.001,
        drop_image_emb=0.1, drop_text=0.5, min_snr_gamma=0.0)
    c.train.update(batch_size=16, num_steps=2000, log_every=50, ckpt_every=500)
    c.optim.update(lr=3e-4, warmup_steps=100, schedule="constant", ema_decay=0.999)
    if arg == "smoke":
        c.model.update(base_channels=16, channel_mult=(1, 2), text_depth=1, text_width=32,
                       head_channels=16, clip_dim=32, image_emb_scale=32 ** 0.5)
        c.train.update(batch_size=8, num_steps=200, log_every=20, ckpt_every=100)
    return c
