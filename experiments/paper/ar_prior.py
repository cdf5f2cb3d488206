"""The paper's AR prior (Table 3): text encoder 256/2048/24/32 + latent decoder 384/1664/24/26
(ctx/width/depth/heads; the text ctx is 77 here, see Deviation).

Run (accelerators), as the paper: a CLIP embedding cache first (ViT-H/14; any local Hugging Face
CLIP directory CLIP), then the prior on it:
  python -m unclip_jax.embed --config=experiments/paper/embed.py --out=CACHE \
      --config.embed.clip_dir=CLIP --config.data.path='/data/web/{split}/*.tar'
  python -m unclip_jax.main --config=experiments/paper/ar_prior.py \
      --workdir=runs/paper_ar_prior --config.data.cache_dir=CACHE --config.tokenizer.dir=CLIP \
      --config.model.codec_path=CACHE/ar_codec_319x1024.npz
  (the codec - PCA keeping 319 of 1024 components, 1024 equal-mass buckets each, and the
  z_i . z_t buckets - is fitted from the cache's train split on first use, streamed: every
  process reads its own shards.)
Smoke (CPU, no input): --config=experiments/paper/ar_prior.py:smoke --workdir=W makes webdataset
  shards, a random HF CLIP and its cache under W/smoke_data the same way (unclip_jax.stages.smoke),
  fits the codec there, then trains 2 steps at tiny widths.
Reach (paper): MS-COCO zero-shot FID 10.63 with the 3.5B decoder; dot token sampled from the top
  half of its distribution.
Deviation: text_ctx is 77, CLIP's context (the encoder reads CLIP's per-token encodings, and
  CLIP has 77); Table 3's 256 is GLIDE's text context.

How the table is read: the text encoder (2048 wide, 24 deep, bidirectional over the 77 caption
token encodings and z_t) is projected to 1664 and prefixes the latent decoder's causal sequence;
"ctx 384" is the latent budget (1 dot token + 319 PC tokens = 320 fit), the 78 prefix positions
come on top. Count (jax.eval_shape, tests/stages/test_prior_paper_config.py): 2,018,564,096
parameters (~2.02B: encoder ~1.21B + decoder ~0.80B + embeddings and projections), twice the
table's "1B": the table evidently counts the latent decoder only (24 * 12 * 1664^2 = 0.80B).
"""
import ml_collections

from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.data.tokenizer import tokenizer_config
from unclip_jax.models import ar_prior_model_config
from unclip_jax.stages.smoke import SMOKE_CLIP, smoke_variant


def get_config(arg=None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"experiments/paper/ar_prior.py: unknown variant {arg!r} (use :smoke)")
    c = base_config()
    c.stage = "ar_prior"
    c.model = ar_prior_model_config(
        embed_dim=1024, pca_components=319, num_buckets=1024, text_ctx=77, vocab_size=0,
        text_dim=1024, enc_width=2048, enc_depth=24, enc_heads=32, dec_width=1664, dec_depth=24,
        dec_heads=26, mlp_ratio=4.0, dropout=0.0, drop_prob=0.1, codec_path="", dtype="bfloat16",
        remat=True)
    c.sampling = dict(temperature=1.0, top_k=0, dot_top_half=True)
    c.data = default_data_config("embed_cache")
    c.tokenizer = tokenizer_config(dir="")
    c.train.update(batch_size=4096, num_steps=1_000_000, log_every=100, ckpt_every=5000)
    c.optim.update(lr=1.6e-4, b1=0.9, b2=0.91, eps=1e-10, weight_decay=4.0e-2,
                   ema_decay=0.999, warmup_steps=10_000, schedule="cosine", grad_clip=1.0)
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    # Ahead-of-time plan (python -m unclip_jax.tools.aot --config=THIS): 64 v5p chips, mesh 8 x 8,
    # 64 examples per chip, bf16 compute, blocks rematerialised.
    c.aot = ml_collections.ConfigDict(dict(topology="v5p:4x4x4"))
    if arg == "smoke":
        c.model.update(embed_dim=SMOKE_CLIP["projection_dim"], pca_components=5, num_buckets=16,
                       text_dim=SMOKE_CLIP["text_width"], enc_width=32, enc_depth=1, enc_heads=2,
                       dec_width=32, dec_depth=1, dec_heads=2)
        smoke_variant(c, image_size=64, clip=SMOKE_CLIP)
    return c
