"""A small diffusion prior for the shapes world (CPU-sized).

Run:   python -m unclip_jax.main --config=experiments/prior_shapes.py --workdir=runs/prior_shapes \
           --config.data.cache_dir=runs/shapes_cache --config.tokenizer.dir=TOKDIR
       where runs/shapes_cache is `python -m unclip_jax.embed` output from the shapes CLIP
       (token_embeddings included) and TOKDIR its tokenizer (for the eos id of the token mask).
       `--config=experiments/prior_shapes.py:synthetic` trains on 256 fixed synthetic pairs
       instead (no cache needed; a smoke run).
Reach: synthetic: x0-MSE from ~1.0 to below ~0.1 in 2000 steps; shapes cache: sampled z_i
       (best of 2) with cosine to the true z_i well above z_t's own cosine to it.
"""
from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.data.tokenizer import tokenizer_config
from unclip_jax.models import diffusion_prior_model_config
from unclip_jax.stages.diffusion_prior import diffusion_config


def get_config(arg=None):
    c = base_config()
    c.stage = "diffusion_prior"
    c.model = diffusion_prior_model_config(
        embed_dim=64, width=256, depth=4, heads=4, text_ctx=32, vocab_size=0, text_dim=128,
        mlp_ratio=4.0, dropout=0.0, drop_prob=0.1, scale_mode="fixed",
        scale=8.0)   # sqrt(64): unit vectors -> per-dim std ~1
    c.diffusion = diffusion_config(
        schedule="cosine", num_timesteps=1000, sampling_steps="64", num_candidates=2)
    c.data = default_data_config("embed_cache")
    c.tokenizer = tokenizer_config(dir="")
    if arg == "synthetic":
        c.data = dict(name="synthetic", num_examples=256, seed=0)
        c.model.update(vocab_size=64, text_dim=0)
    c.train.update(batch_size=64, num_steps=2000, log_every=50, ckpt_every=500)
    c.optim.update(lr=3e-4, warmup_steps=100, schedule="cosine", b2=0.96, eps=1e-6,
                   weight_decay=6.0e-2, ema_decay=0.999)
    return c
