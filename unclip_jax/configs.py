"""Defaults shared by every experiment config; experiments/*.py start from `base_config()`.

Layout of a config (fields the trainer reads are listed; `model`, `data` and `diffusion` belong to
the stage named by `stage`):
  stage            name of a registered stage (unclip_jax.stages)
  seed             seeds parameters, dropout and data order
  model.dtype      compute dtype ("float32" on CPU, "bfloat16" on accelerators); params stay float32
  model.remat      rematerialise blocks in the backward pass
  train.*          batch size (global), steps, accumulation, logging / checkpoint cadence,
                   the PRNG of the parameter init
  optim.*          AdamW + schedule + clipping + EMA
  mesh.*           data / fsdp / tensor sizes (-1 fills), dcn_* for multi-slice, logical rules,
                   cpu_devices (CPU: one device per core, see parallel.split_cpu_devices)
  aot.topology     TPU topology unclip_jax.tools.aot compiles for ("" : give --topology)
Each stage's own sections start from their builders: models.*_model_config (config.model),
data.default_data_config (config.data), stages.decoder / stages.upsampler `diffusion_config` or
diffusion.diffusion_config (config.diffusion), data.tokenizer.tokenizer_config (config.tokenizer),
embed.embed_config (config.embed); the code reads every field without a default of its own.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "toy"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(dtype="float32", remat=False))
    c.data = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(
        batch_size=32,          # global batch, split over processes and the data axes
        num_steps=1000,
        grad_accum=1,           # micro-batches per step (batch_size must divide by it)
        log_every=50,
        ckpt_every=500,
        keep=3,                 # checkpoints kept on disk
        max_bad_steps=10,       # non-finite steps in a row before the run stops
        async_checkpoint=True,
        eval_every=0,
        # JAX PRNG implementation of the parameter initialisation draws (dropout and data keys
        # stay threefry): "rbg" draws the same distributions with XLA's RngBitGenerator, whose
        # init program XLA:CPU compiles ~3x faster (other values than threefry's).
        init_prng="threefry2x32",
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4,
        schedule="constant",    # "constant" or "cosine" (both after linear warmup)
        warmup_steps=0,
        end_lr_frac=0.0,        # cosine: final lr as a fraction of lr
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,          # global norm; 0 disables
        ema_decay=0.9999,
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1,
        num_devices=0,          # 0: all devices; n: the first n (reference runs, scaling)
        cpu_devices=0,          # CPU hosts: XLA devices to split the cores into (-1: one per
                                # core, data parallel; 0: JAX's default, one device)
        rules=(),               # () -> unclip_jax.parallel.DEFAULT_RULES
    ))
    c.aot = ml_collections.ConfigDict(dict(topology=""))
    return c
