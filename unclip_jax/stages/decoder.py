"""The `decoder` stage: unCLIP's 64x64 decoder, P(x | z_i, caption).

Objective (paper / GLIDE): eps prediction with learned variance through IDDPM's hybrid loss
(`config.diffusion.vlb_weight`), uniform timesteps, classifier-free guidance dropout of z_i
(`config.diffusion.drop_image_emb`, 10%) and of the caption (`config.diffusion.drop_text`, 50%).

Batches: "image" [B, S, S, 3] in [-1, 1], "image_emb" [B, clip_dim] float32, "tokens" [B, L] int32,
"token_mask" [B, L] bool. z_i and tokens come from an embedding cache (data.name="embed_cache":
columns "image_embedding", "tokens") or, before CLIP exists, from STAND-INS chosen by
`config.model.image_emb_source` / `config.model.tokens_source` ("cache", "auto" = cache when
present, or the stand-in):
  "pixels"  z_i = a FIXED (not learned) random projection of the 8x8 area-downsampled image,
            L2-normalised like a CLIP embedding. It is not CLIP: it carries layout and colour only.
  "bytes"   tokens = the caption's UTF-8 bytes + 1 (0 = padding), truncated to text_ctx; needs
            text_vocab >= 257.
`config.model.image_emb_scale` multiplies z_i (either source). Cached tokens are masked after
their first eos when `config.tokenizer.dir` names the tokenizer that wrote them (a pretrained
CLIP's), else where they equal `config.model.text_pad_id`; padding to text_ctx uses that id.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion
from unclip_jax.models import model_from_config
from unclip_jax.stages.base import Stage

SOURCES_EMB = ("cache", "pixels", "auto")
SOURCES_TOK = ("cache", "bytes", "auto")


@functools.lru_cache(maxsize=8)
def schedule_for(kind: str, num_timesteps: int):
    """Training noise schedule (built once, outside any trace)."""
    return diffusion.make_schedule(kind, num_timesteps)


def unet_diffusion_config(**kw):
    """`config.diffusion` fields shared by the U-Net stages (decoder, upsampler)."""
    return diffusion.diffusion_config(**dict(dict(
        parameterization="eps",     # "eps" | "x0" | "v"
        vlb_weight=0.001,           # hybrid loss (learned sigma): IDDPM's lambda
        min_snr_gamma=0.0,          # > 0: min-SNR loss weighting; 0: plain MSE
    ), **kw))


def diffusion_config(**kw):
    """`config.diffusion` of the decoder stage."""
    return unet_diffusion_config(**dict(dict(
        drop_image_emb=0.1,         # classifier-free guidance dropout of z_i
        drop_text=0.5,              # and of the caption
    ), **kw))


def validate_diffusion(config) -> None:
    d = config.diffusion
    if d.schedule not in ("cosine", "linear"):
        raise ValueError(f"config.diffusion.schedule: {d.schedule!r} is not cosine/linear")
    if d.parameterization not in ("eps", "x0", "v"):
        raise ValueError(f"config.diffusion.parameterization: {d.parameterization!r} is not "
                         "eps/x0/v")
    if int(d.num_timesteps) < 2:
        raise ValueError("config.diffusion.num_timesteps must be >= 2")
    if float(d.min_snr_gamma) < 0:
        raise ValueError("config.diffusion.min_snr_gamma must be >= 0 (0 disables it)")


def noised(config, rng, x0):
    """(schedule, t, noise, x_t) for a batch of clean images x0."""
    d = config.diffusion
    schedule = schedule_for(str(d.schedule), int(d.num_timesteps))
    k_t, k_n = jax.random.split(rng)
    t = diffusion.sample_timesteps(k_t, x0.shape[0], int(d.num_timesteps))
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    return schedule, t, noise, diffusion.q_sample(schedule, x0, t, noise)


@functools.lru_cache(maxsize=4)
def _pixel_projection(dim: int) -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((8 * 8 * 3, dim)).astype(np.float32)


def pixel_image_embedding(images: np.ndarray, dim: int) -> np.ndarray:
    """STAND-IN for a CLIP image embedding: fixed projection of the 8x8 image, unit norm."""
    b, h, w, c = images.shape
    if h % 8 or w % 8:
        raise ValueError(f"pixel stand-in embedding needs a size divisible by 8, got {h}x{w}")
    small = images.reshape(b, 8, h // 8, 8, w // 8, c).mean(axis=(2, 4)).reshape(b, -1)
    z = small @ _pixel_projection(dim)
    return (z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-6)).astype(np.float32)


def byte_tokenize(captions, ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """STAND-IN tokenizer: UTF-8 bytes + 1, 0-padded / truncated to ctx -> (tokens, mask)."""
    tokens = np.zeros((len(captions), ctx), np.int32)
    for i, cap in enumerate(captions):
        ids = np.frombuffer(str(cap).encode("utf-8")[:ctx], np.uint8).astype(np.int32) + 1
        tokens[i, :len(ids)] = ids
    return tokens, tokens != 0


@functools.lru_cache(maxsize=4)
def _tokenizer_eos(directory: str) -> int:
    from unclip_jax.data.tokenizer import Tokenizer
    return Tokenizer.load(directory).eos_id


def _eos_id(config) -> int | None:
    """The eos id of config.tokenizer.dir (the tokenizer that wrote the cached tokens), if set."""
    if "tokenizer" not in config or not config.tokenizer.dir:
        return None
    return _tokenizer_eos(str(config.tokenizer.dir))


def decoder_tokens(config, tokens, xp=np):
    """Tokenizer output [B, L] -> the decoder's (tokens, mask) [B, text_ctx] (cut or padded with
    model.text_pad_id). The mask ends at the first eos of config.tokenizer.dir's tokenizer when
    set (CLIP pads with its eos or "!", id 0, not a pad id), else at the pad id. `xp`: np, or
    jnp inside a traced sampler."""
    m = config.model
    ctx, pad_id = int(m.text_ctx), int(m.text_pad_id)
    tokens = tokens[:, :ctx]
    eos = _eos_id(config)
    if eos is None:
        mask = tokens != pad_id
    else:
        is_eos = tokens == eos
        first = xp.where(is_eos.any(1), xp.argmax(is_eos, 1), tokens.shape[1] - 1)
        mask = xp.arange(tokens.shape[1])[None] <= first[:, None]
    extra = ((0, 0), (0, ctx - tokens.shape[1]))
    return (xp.pad(tokens, extra, constant_values=pad_id),
            xp.pad(mask, extra, constant_values=False))


def decoder_batch(config, b: dict) -> dict:
    """A data batch -> the decoder's: adds image_emb / tokens / token_mask, drops strings."""
    m = config.model
    clip_dim, ctx = int(m.clip_dim), int(m.text_ctx)
    out = {"image": np.asarray(b["image"], np.float32)}
    if clip_dim:
        if m.image_emb_source != "pixels" and "image_embedding" in b:
            z = np.asarray(b["image_embedding"], np.float32)
        elif m.image_emb_source == "cache":
            raise ValueError("config.model.image_emb_source='cache' but the data has no "
                             "'image_embedding' column (use data.name='embed_cache')")
        else:
            z = pixel_image_embedding(out["image"], clip_dim)
        if z.shape[-1] != clip_dim:
            raise ValueError(f"config.model.clip_dim={clip_dim} but the cached image "
                             f"embeddings have dim {z.shape[-1]}")
        out["image_emb"] = z * float(m.image_emb_scale)
    if int(m.text_depth) > 0:
        if m.tokens_source != "bytes" and "tokens" in b:
            tok = np.asarray(b["tokens"], np.int32)
            if _eos_id(config) is not None:
                from unclip_jax.stages.diffusion_prior import check_eos
                check_eos(tok, _eos_id(config), str(config.tokenizer.dir))
            tok, mask = decoder_tokens(config, tok)
        elif m.tokens_source == "cache":
            raise ValueError("config.model.tokens_source='cache' but the data has no "
                             "'tokens' column (use data.name='embed_cache')")
        else:
            tok, mask = byte_tokenize(b["caption"], ctx)
        out["tokens"], out["token_mask"] = tok, mask
    return out


class DecoderStage(Stage):
    name = "decoder"

    def validate(self, config):
        m = config.model
        if m.kind != "decoder":
            raise ValueError(f"config.model.kind must be 'decoder' for the decoder stage, "
                             f"got {m.kind!r}")
        if int(config.data.resolution) != int(m.image_size):
            raise ValueError(f"config.data.resolution={config.data.resolution} must equal "
                             f"config.model.image_size={m.image_size}")
        if m.image_emb_source not in SOURCES_EMB:
            raise ValueError(f"config.model.image_emb_source must be one of {SOURCES_EMB}")
        if m.tokens_source not in SOURCES_TOK:
            raise ValueError(f"config.model.tokens_source must be one of {SOURCES_TOK}")
        if int(m.text_depth) and m.tokens_source != "cache" and int(m.text_vocab) < 257:
            raise ValueError("config.model.text_vocab must be >= 257 for the byte stand-in "
                             "tokenizer (tokens_source)")
        for f in ("drop_image_emb", "drop_text"):
            if not 0.0 <= float(config.diffusion[f]) <= 1.0:
                raise ValueError(f"config.diffusion.{f} must be a probability in [0, 1]")
        validate_diffusion(config)
        if bool(m.learn_sigma) and config.diffusion.parameterization == "v":
            raise ValueError("config.model.learn_sigma with config.diffusion.parameterization="
                             "'v' is not supported; use 'eps' (the paper's hybrid loss)")
        model_from_config(m)   # raises on bad architecture fields

    def build_model(self, config):
        return model_from_config(config.model)

    def example_batch(self, config, batch_size):
        m, s = config.model, int(config.model.image_size)
        out = {"image": np.zeros((batch_size, s, s, 3), np.float32)}
        if int(m.clip_dim):
            out["image_emb"] = np.zeros((batch_size, int(m.clip_dim)), np.float32)
        if int(m.text_depth):
            out["tokens"] = np.zeros((batch_size, int(m.text_ctx)), np.int32)
            out["token_mask"] = np.ones((batch_size, int(m.text_ctx)), bool)
        return out

    def init(self, model, rng, batch):
        x = jnp.asarray(batch["image"])
        t = jnp.zeros((x.shape[0],), jnp.int32)
        return model.init({"params": rng}, x, t, batch.get("image_emb"), batch.get("tokens"),
                          batch.get("token_mask"))

    def loss(self, model, params, batch, rng, config):
        x0 = batch["image"].astype(jnp.float32)
        b = x0.shape[0]
        k_diff, k_di, k_dt, k_drop = jax.random.split(rng, 4)
        schedule, t, noise, x_t = noised(config, k_diff, x0)
        d = config.diffusion
        drop_i = jax.random.bernoulli(k_di, float(d.drop_image_emb), (b,))
        drop_t = jax.random.bernoulli(k_dt, float(d.drop_text), (b,))
        out = model.apply({"params": params}, x_t, t, batch.get("image_emb"),
                          batch.get("tokens"), batch.get("token_mask"), drop_image_emb=drop_i,
                          drop_text=drop_t, train=True, rngs={"dropout": k_drop})
        per_ex, terms = diffusion.diffusion_loss(
            schedule, out, x0, x_t, t, noise, parameterization=str(d.parameterization),
            learned_variance=bool(config.model.learn_sigma), vlb_weight=float(d.vlb_weight),
            min_snr_gamma=float(d.min_snr_gamma))
        metrics = {k: jnp.mean(v) for k, v in terms.items()}
        return jnp.mean(per_ex), metrics

    def make_data(self, config, *, split, process_index, process_count, local_batch_size, seed):
        from unclip_jax.data import make_iterator
        return make_iterator(config.data, split=split, process_index=process_index,
                             process_count=process_count, local_batch_size=local_batch_size,
                             seed=seed, postprocess=functools.partial(decoder_batch, config))
