"""unCLIP decoder, 64x64, paper scale (Table 3 of Ramesh et al. 2022; GLIDE 3.5B).

Run (accelerators), as the paper: a CLIP embedding cache of the images first (ViT-H/14; any
local Hugging Face CLIP directory CLIP), then the decoder on it (z_i and CLIP's caption tokens
from the cache, the images read back from the shards by index):
  python -m unclip_jax.embed --config=experiments/paper/embed.py --out=CACHE \
      --config.embed.clip_dir=CLIP --config.data.path='/data/web/{split}/*.tar'
  python -m unclip_jax.main --config=experiments/paper/decoder_64.py --workdir=runs/decoder_64 \
      --config.data.cache_dir=CACHE --config.tokenizer.dir=CLIP
  (the tokenizer's eos ends each caption's mask: CLIP pads with its eos or with "!", id 0, not a
  pad id of its own.)
Smoke (CPU, no input): --config=experiments/paper/decoder_64.py:smoke --workdir=W makes webdataset
  shards, a random HF CLIP and its cache under W/smoke_data the same way (unclip_jax.stages.smoke),
  then trains 2 steps at tiny widths.
Table 3: cosine schedule, T=1000, learned sigma (hybrid loss), base 512, channel mult 1,2,3,4,
3 res blocks, attention at 32,16,8 with 64 channels per head, dropout 0.1, text encoder
ctx 256 / width 2048 / depth 24 / heads 32, batch 2048, 800K iterations, AdamW lr 1.2e-4,
beta2 0.999, eps 1e-8, EMA 0.9999 (no weight decay listed). Sampling: 250 strided steps, guidance
1.25 for the paper's MS-COCO FID. Guidance dropout: z_i 10%, caption 50%.

Parameter count (jax.eval_shape, tests/models/test_unet_paper.py): ~3.57B = U-Net ~2.25B (incl. the
per-attention-layer context K/V projections and the z_i projections) + text transformer
~1.21B + token embedding ~0.10B. Reading: GLIDE's text encoder uses GPT-2's BPE vocabulary of
50257 tokens; we pad it to 50304 (a multiple of 128) so the table shards over `tensor`. CLIP's
49408-token BPE fits in it too, so tokens from a CLIP embedding cache can be used directly
(tokens_source="cache"; 77 of them, padded to the 256 positions and masked after their eos).
"""
import ml_collections

from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.data.tokenizer import tokenizer_config
from unclip_jax.models import decoder_model_config
from unclip_jax.stages.decoder import diffusion_config
from unclip_jax.stages.smoke import SMOKE_CLIP, smoke_variant


def get_config(arg=None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"experiments/paper/decoder_64.py: unknown variant {arg!r} (use :smoke)")
    c = base_config()
    c.stage = "decoder"
    c.model = decoder_model_config(
        dtype="bfloat16", param_dtype="float32", remat=True,
        image_size=64, base_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
        attention_resolutions=(32, 16, 8), head_channels=64, norm_groups=32, dropout=0.1,
        learn_sigma=True, clip_dim=1024, clip_tokens=4,
        text_vocab=50304, text_ctx=256, text_width=2048, text_depth=24, text_heads=32,
        image_emb_source="cache", tokens_source="cache", image_emb_scale=1.0, text_pad_id=0,
        # The 24 caption-encoder blocks as one nn.scan, and each level's same-shaped U-Net
        # blocks too: a program small enough to compile on a 24 GB host (unrolled, it is not).
        text_scan=True, scan_blocks=True)
    c.data = default_data_config("embed_cache")
    c.data.resolution = 64
    c.data.join_images = True
    c.tokenizer = tokenizer_config(dir="")   # the CLIP directory whose tokenizer wrote the cache
    c.diffusion = diffusion_config(
        schedule="cosine", num_timesteps=1000, parameterization="eps", vlb_weight=0.001,
        drop_image_emb=0.1, drop_text=0.5, sampling_steps="250", guidance_scale=1.25)
    c.train.update(batch_size=2048, num_steps=800_000, log_every=100, ckpt_every=5000)
    c.optim.update(lr=1.2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, ema_decay=0.9999,
                   warmup_steps=10_000, schedule="constant", grad_clip=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    # Ahead-of-time plan (python -m unclip_jax.tools.aot --config=THIS): 128 v5p chips, all fsdp,
    # 16 examples per chip, bf16 compute, res blocks and text blocks rematerialised.
    c.aot = ml_collections.ConfigDict(dict(topology="v5p:4x4x8"))
    if arg == "smoke":
        # Two levels, not the paper's 4: XLA's compile time grows with every level.
        # 16 channels per head (2 heads at 32x32): its 1024-pixel attention is most of a
        # CPU step, and 4 heads of 8 cost ~2 s more per step.
        c.model.update(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(32,), head_channels=16, norm_groups=8,
                       clip_dim=SMOKE_CLIP["projection_dim"], text_vocab=1024, text_width=32,
                       text_depth=1, text_heads=2)
        smoke_variant(c, image_size=64, clip=SMOKE_CLIP)
    return c
