"""The paper's diffusion prior (Table 3): 2048 wide, 24 deep, 32 heads, text ctx 256 (77 here,
see Deviation).

Run (accelerators), as the paper: a CLIP embedding cache first (ViT-H/14; any local Hugging Face
CLIP directory CLIP), then the prior on it:
  python -m unclip_jax.embed --config=experiments/paper/embed.py --out=CACHE \
      --config.embed.clip_dir=CLIP --config.data.path='/data/web/{split}/*.tar'
  python -m unclip_jax.main --config=experiments/paper/diffusion_prior.py \
      --workdir=runs/paper_diffusion_prior --config.data.cache_dir=CACHE --config.tokenizer.dir=CLIP
  (the cache holds CLIP's token encodings - bfloat16 on disk - that the prior reads; the tokenizer
  gives the eos that ends each caption's mask.)
Smoke (CPU, no input): --config=experiments/paper/diffusion_prior.py:smoke --workdir=W makes
  webdataset shards, a random HF CLIP and its cache under W/smoke_data the same way
  (unclip_jax.stages.smoke), then trains 2 steps at tiny widths.
Reach (paper): MS-COCO zero-shot FID 10.39 with the 3.5B decoder, 64 sampling steps (analytic
  variance), best of 2 by z_i . z_t. The analytic variance's statistic is estimated from the
  final EMA weights on `diffusion.analytic_examples` training examples when training ends, into
  WORKDIR/analytic_variance.json (stages/prior_variance.py); sampling reads it.
Deviation: text_ctx is 77, CLIP's context (the prior reads CLIP's per-token encodings, and CLIP
  has 77); Table 3's 256 is GLIDE's text context.

How the table is read: one decoder-only causal transformer over [caption token encodings (CLIP's
1024-wide, projected; 77 positions), z_t, timestep, noised z_i, query] - the table's "text
encoder" row is that transformer. Count (jax.eval_shape, tests/stages/test_prior_paper_config.py):
1,225,718,784 parameters (~1.23B), 12 * 2048^2 * 24 = 1.208B of it in the blocks. That is GLIDE's
own figure for this shape (1.2B), ~23% above the table's rounded "1B".
"""
import ml_collections

from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.data.tokenizer import tokenizer_config
from unclip_jax.models import diffusion_prior_model_config
from unclip_jax.stages.diffusion_prior import diffusion_config
from unclip_jax.stages.smoke import SMOKE_CLIP, smoke_variant


def get_config(arg=None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"experiments/paper/diffusion_prior.py: unknown variant {arg!r} (use "
                         ":smoke)")
    c = base_config()
    c.stage = "diffusion_prior"
    c.model = diffusion_prior_model_config(
        embed_dim=1024, width=2048, depth=24, heads=32, text_ctx=77, vocab_size=0, text_dim=1024,
        mlp_ratio=4.0, dropout=0.0, drop_prob=0.1, scale_mode="fixed", scale=17.2, dtype="bfloat16",
        remat=True)
    c.diffusion = diffusion_config(
        schedule="cosine", num_timesteps=1000, sampling_steps="64", var_type="analytic",
        num_candidates=2)
    c.data = default_data_config("embed_cache")
    c.tokenizer = tokenizer_config(dir="")
    c.train.update(batch_size=4096, num_steps=600_000, log_every=100, ckpt_every=5000)
    c.optim.update(lr=1.1e-4, b1=0.9, b2=0.96, eps=1e-6, weight_decay=6.0e-2,
                   ema_decay=0.9999, warmup_steps=10_000, schedule="cosine", grad_clip=1.0)
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    # Ahead-of-time plan (python -m unclip_jax.tools.aot --config=THIS): 64 v5p chips, mesh 8 x 8,
    # 64 examples per chip, bf16 compute, blocks rematerialised.
    c.aot = ml_collections.ConfigDict(dict(topology="v5p:4x4x4"))
    if arg == "smoke":
        c.model.update(embed_dim=SMOKE_CLIP["projection_dim"], width=32, depth=2, heads=2,
                       text_dim=SMOKE_CLIP["text_width"])
        smoke_variant(c, image_size=64, clip=SMOKE_CLIP)
        c.diffusion.analytic_examples = 16   # the Analytic-DPM statistic from 2 batches
    return c
