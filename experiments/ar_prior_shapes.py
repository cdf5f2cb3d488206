"""A small AR prior for the shapes world (CPU-sized): PCA 32 of 64 dims, 256 buckets.

Run:   python -m unclip_jax.main --config=experiments/ar_prior_shapes.py \
           --workdir=runs/ar_prior_shapes --config.data.cache_dir=runs/shapes_cache \
           --config.tokenizer.dir=TOKDIR --config.model.codec_path=runs/shapes_cache/ar_codec.npz
       (codec fitted from the cache's train split on first use);
       `--config=experiments/ar_prior_shapes.py:synthetic` trains on 1024 synthetic pairs
       (codec written to runs/ar_prior_synthetic_codec.npz).
Reach: synthetic: token cross-entropy from ~log(256)=5.5 to below ~1.5 in 2000 steps;
       shapes cache: decoded samples' cosine to the true z_i well above z_t's.
"""
from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.data.tokenizer import tokenizer_config
from unclip_jax.models import ar_prior_model_config


def get_config(arg=None):
    c = base_config()
    c.stage = "ar_prior"
    c.model = ar_prior_model_config(
        embed_dim=64, pca_components=32, num_buckets=256, text_ctx=32, vocab_size=0, text_dim=128,
        enc_width=192, enc_depth=2, enc_heads=3, dec_width=192, dec_depth=4, dec_heads=3,
        mlp_ratio=4.0, dropout=0.0, drop_prob=0.1, codec_path="runs/shapes_cache/ar_codec.npz")
    c.data = default_data_config("embed_cache")
    c.tokenizer = tokenizer_config(dir="")
    if arg == "synthetic":
        c.data = dict(name="synthetic", num_examples=1024, seed=0)
        c.model.update(vocab_size=64, text_dim=0, codec_path="runs/ar_prior_synthetic_codec.npz")
    c.train.update(batch_size=64, num_steps=2000, log_every=50, ckpt_every=500)
    c.optim.update(lr=3e-4, warmup_steps=100, schedule="cosine", b2=0.91, eps=1e-10,
                   weight_decay=4.0e-2, ema_decay=0.999)
    return c
