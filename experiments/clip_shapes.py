"""A small CLIP trained from scratch on the built-in shapes dataset (64x64, CPU-sized).

Run:   python -m unclip_jax.main --config=experiments/clip_shapes.py --workdir=runs/clip_shapes
       (the tokenizer is trained from 5000 training captions and saved to
        runs/clip_shapes/tokenizer on first use; --config.tokenizer.dir=... to share one)
Reach: contrastive loss from ~log(64)=4.16 to below ~1.0 and in-batch retrieval accuracy above
       ~0.6 within 3000 steps (captions name colour/shape/position, so some pairs stay ambiguous).
"""
from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.data.tokenizer import tokenizer_config
from unclip_jax.models import clip_model_config


def get_config(arg=None):
    c = base_config()
    c.stage = "clip"
    c.model = clip_model_config(
        embed_dim=64, image_size=64, patch=8, vision_width=128, vision_depth=4, vision_heads=4,
        text_ctx=32, text_width=128, text_depth=4, text_heads=4, mlp_ratio=4.0, act="quick_gelu",
        vocab_size=512)
    c.data = default_data_config("shapes")
    c.data.resolution = 64
    c.tokenizer = tokenizer_config(dir="runs/clip_shapes/tokenizer", num_captions=5000)
    c.train.update(batch_size=64, num_steps=3000, log_every=50, ckpt_every=500)
    c.optim.update(lr=5e-4, warmup_steps=200, schedule="cosine", b2=0.98, eps=1e-6,
                   weight_decay=0.1, ema_decay=0.999)
    return c
