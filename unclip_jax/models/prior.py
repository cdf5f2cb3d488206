"""The diffusion prior: a decoder-only transformer that predicts the clean CLIP image embedding.

Sequence, in order, under a causal mask (paper): [caption tokens (L), z_t, timestep embedding,
noised z_i, learned query]; the query's output is the x0 prediction of z_i (loss: MSE on x0).
Captions enter as token ids (own embedding table, `vocab_size > 0`) or as precomputed token
encodings [B, L, text_dim] (e.g. CLIP's, from the embedding cache). When `cond["drop"]` is True
the caption tokens and z_t are replaced by learned nulls (classifier-free guidance).

Embeddings are scaled before diffusion (`EmbeddingScaling`): fixed 17.2 (paper; unit vectors of
1024 dims then have per-dimension std ~0.54) or standardised with dataset mean/std, clamped to
+-10 (Karlo). `sample_prior` runs the shared sampler and keeps the best of N candidates by
z_i . z_t (paper: N = 2).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion
from unclip_jax.models.layers import Dense, timestep_embedding
from unclip_jax.models.transformer import Transformer

Dtype = Any


def _p(module, name, init, axes, shape):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class CaptionPrefix(nn.Module):
    """Caption tokens + z_t -> ([B, L, W] token vectors, [B, W] z_t vector, key mask [B, L]),
    with learned nulls for rows where `drop` is True. Shared by both priors."""
    width: int
    text_ctx: int
    vocab_size: int = 0        # > 0: embed token ids; 0: project cond["token_embeddings"]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond):
        mask = jnp.asarray(cond["token_mask"]).astype(bool)
        b, length = mask.shape
        if length != self.text_ctx:
            raise ValueError(f"prior: captions have {length} tokens, config.model.text_ctx is "
                             f"{self.text_ctx}")
        if self.vocab_size > 0:
            tab = _p(self, "token_embedding", nn.initializers.normal(0.02), ("vocab", "embed"),
                     (self.vocab_size, self.width))
            tok = jnp.take(tab, cond["tokens"], axis=0)
        else:
            tok = Dense(self.width, axes=(None, "embed"), name="token_proj", dtype=self.dtype)(
                cond["token_embeddings"].astype(self.dtype))
        zt = Dense(self.width, axes=(None, "embed"), name="text_emb_proj", dtype=self.dtype)(
            cond["z_t"].astype(self.dtype))
        drop = cond.get("drop")
        if drop is not None:
            drop = drop.astype(bool)
            null_tok = _p(self, "null_tokens", nn.initializers.normal(0.02), (None, "embed"),
                          (self.text_ctx, self.width))
            null_zt = _p(self, "null_text_emb", nn.initializers.normal(0.02), ("embed",),
                         (self.width,))
            tok = jnp.where(drop[:, None, None], null_tok[None].astype(tok.dtype), tok)
            zt = jnp.where(drop[:, None], null_zt[None].astype(zt.dtype), zt)
            mask = mask | drop[:, None]  # the null sequence is attended in full
        # Position 0 always counts as a key, so no causal row of the prefix is entirely masked.
        mask = mask.at[:, 0].set(True)
        return tok, zt, mask


class DiffusionPrior(nn.Module):
    """(x_t [B, D], t [B] int, cond) -> x0 prediction [B, D] float32.

    cond: {"z_t" [B, D], "tokens" [B, L] or "token_embeddings" [B, L, Wt], "token_mask" [B, L],
    optional "drop" [B] bool}."""
    embed_dim: int
    width: int
    depth: int
    heads: int
    text_ctx: int
    vocab_size: int = 0
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    remat: bool = False
    # False: exact GELU in the MLPs, as diffusers' PriorTransformer (Karlo) computes it.
    gelu_approximate: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t, t, cond, train: bool = False):
        kw = dict(dtype=self.dtype)
        tok, zt, mask = CaptionPrefix(self.width, self.text_ctx, self.vocab_size, name="caption",
                                      **kw)(cond)
        b = x_t.shape[0]
        temb = timestep_embedding(t, self.width)
        temb = Dense(self.width, axes=(None, "embed"), name="time_1", **kw)(temb.astype(self.dtype))
        temb = Dense(self.width, axes=("embed", "mlp"), name="time_2", **kw)(nn.silu(temb))
        xe = Dense(self.width, axes=(None, "embed"), name="x_proj", **kw)(x_t.astype(self.dtype))
        query = _p(self, "query", nn.initializers.normal(0.02), ("embed",), (self.width,))
        tail = jnp.stack([zt, temb, xe, jnp.broadcast_to(query.astype(xe.dtype), xe.shape)], 1)
        x = jnp.concatenate([tok.astype(self.dtype), tail.astype(self.dtype)], axis=1)
        pos = _p(self, "positional_embedding", nn.initializers.normal(0.01), (None, "embed"),
                 (self.text_ctx + 4, self.width))
        x = x + pos[None].astype(self.dtype)
        mask = jnp.concatenate([mask, jnp.ones((b, 4), bool)], axis=1)
        x = Transformer(self.width, self.depth, self.heads, self.mlp_ratio, causal=True,
                        dropout=self.dropout, final_norm=True, remat=self.remat,
                        gelu_approximate=self.gelu_approximate, name="transformer", **kw)(
                            x, mask, train)
        return Dense(self.embed_dim, axes=("embed", None), name="out", **kw)(x[:, -1]).astype(
            jnp.float32)


# ------------------------------------------------------------------------------------- scaling
@dataclasses.dataclass(frozen=True)
class EmbeddingScaling:
    """z -> (z - mean) / std (clamped to +-clamp if set), separately for image and text
    embeddings. Fixed scaling s is mean 0, std 1/s."""
    image_mean: Any = 0.0
    image_std: Any = 1.0
    text_mean: Any = 0.0
    text_std: Any = 1.0
    clamp: float | None = None

    @classmethod
    def fixed(cls, scale: float = 17.2) -> "EmbeddingScaling":
        return cls(0.0, 1.0 / scale, 0.0, 1.0 / scale)

    @classmethod
    def from_stats(cls, path: str, clamp: float = 10.0) -> "EmbeddingScaling":
        from unclip_jax import paths
        with paths.np_load(path) as f:
            return cls(f["image_mean"], f["image_std"], f["text_mean"], f["text_std"], clamp)

    def _n(self, z, mean, std):
        z = (z - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
        return z if self.clamp is None else jnp.clip(z, -self.clamp, self.clamp)

    def image(self, z):
        return self._n(z.astype(jnp.float32), self.image_mean, self.image_std)

    def text(self, z):
        return self._n(z.astype(jnp.float32), self.text_mean, self.text_std)

    def image_inverse(self, z):
        return z * jnp.asarray(self.image_std, jnp.float32) + jnp.asarray(self.image_mean,
                                                                           jnp.float32)


def save_embedding_stats(path: str, image_embeddings, text_embeddings) -> None:
    """Per-dimension mean / std of the embeddings (for EmbeddingScaling.from_stats)."""
    i, t = np.asarray(image_embeddings, np.float64), np.asarray(text_embeddings, np.float64)
    with open(path, "wb") as f:  # a file object: savez must not append ".npz" to path
        np.savez(f, image_mean=i.mean(0).astype(np.float32),
                 image_std=np.maximum(i.std(0), 1e-6).astype(np.float32),
                 text_mean=t.mean(0).astype(np.float32),
                 text_std=np.maximum(t.std(0), 1e-6).astype(np.float32))


# ------------------------------------------------------------------------------------ training
def prior_loss(model, params, batch, rng, schedule, scaling: EmbeddingScaling,
               drop_prob: float = 0.1, train: bool = True):
    """x0-prediction MSE on scaled z_i with the caption (tokens and z_t) dropped at drop_prob.
    batch: image_embedding, text_embedding, token_mask, tokens or token_embeddings."""
    z_i = scaling.image(batch["image_embedding"])
    b = z_i.shape[0]
    r_t, r_n, r_d, r_do = jax.random.split(rng, 4)
    t = diffusion.sample_timesteps(r_t, b, schedule.num_timesteps)
    noise = jax.random.normal(r_n, z_i.shape, jnp.float32)
    x_t = diffusion.q_sample(schedule, z_i, t, noise)
    cond = make_cond(batch, scaling)
    cond["drop"] = jax.random.bernoulli(r_d, drop_prob, (b,))
    out = model.apply({"params": params}, x_t, t, cond, train=train, rngs={"dropout": r_do})
    loss, terms = diffusion.diffusion_loss(schedule, out, z_i, x_t, t, noise,
                                           parameterization="x0")
    return jnp.mean(loss), {"mse": jnp.mean(terms["mse"])}


def make_cond(batch, scaling: EmbeddingScaling) -> dict:
    cond = {"z_t": scaling.text(batch["text_embedding"]), "token_mask": batch["token_mask"]}
    for k in ("tokens", "token_embeddings"):
        if k in batch:
            cond[k] = batch[k]
    return cond


# ------------------------------------------------------------------------------------ sampling
def best_of_n(candidates, z_t):
    """candidates [N, B, D], z_t [B, D] -> [B, D]: per example the candidate with the largest
    dot product with z_t (paper: N = 2)."""
    scores = jnp.einsum("nbd,bd->nb", candidates.astype(jnp.float32), z_t.astype(jnp.float32))
    best = jnp.argmax(scores, axis=0)
    return jnp.take_along_axis(candidates, best[None, :, None], axis=0)[0]


def prior_eps_sq_norm(model, params, batch, rng, *, schedule, scaling: EmbeddingScaling):
    """Analytic-DPM's statistic E ||eps_theta(x_n, n)||^2 / d [N] at every index of `schedule`,
    averaged over this batch of data (the caption kept: the conditional model is what samples),
    and the batch's per-dimension sums of the scaled x0 and x0^2 [D] (for the data-variance
    bound on the optimal variance). The eps comes from the x0 prediction, as in sampling."""
    x0 = scaling.image(batch["image_embedding"])
    cond = make_cond(batch, scaling)
    cond["drop"] = jnp.zeros((x0.shape[0],), bool)
    eps = diffusion.estimate_eps_sq_norm(
        lambda x, t, c: model.apply({"params": params}, x, t, c), schedule, x0, rng, cond,
        parameterization="x0")
    return eps, jnp.sum(x0, 0), jnp.sum(x0 ** 2, 0)


def sample_prior(model, params, batch, rng, *, schedule, scaling: EmbeddingScaling,
                 steps: str = "64", guidance_scale: float = 1.0, num_candidates: int = 2,
                 method: str = "ddpm", var_type: str = "fixed_small", eps_sq_norm=None,
                 x0_range: float | None = None, return_candidates: bool = False):
    """Image embeddings [B, D] (unscaled) for the captions in `batch` (text_embedding,
    token_mask, tokens or token_embeddings). `schedule` is the training schedule; it is respaced
    to `steps` here. Guidance > 1 mixes in the learned-null (unconditional) prediction.
    For the paper's analytic variance pass var_type="analytic" and eps_sq_norm (one per step of
    the respaced schedule, from diffusion.estimate_eps_sq_norm) and optionally x0_range (a
    bound on the scaled data's spread, see diffusion.analytic_variance)."""
    fast = diffusion.respace(schedule, steps)
    cond = make_cond(batch, scaling)
    b = cond["z_t"].shape[0]
    n = int(num_candidates)
    tile = lambda x: jnp.concatenate([x] * n, axis=0)  # noqa: E731  candidate-major
    cond = jax.tree.map(tile, cond)
    cond["drop"] = jnp.zeros((n * b,), bool)
    uncond = None
    if guidance_scale != 1.0:
        uncond = dict(cond, drop=jnp.ones((n * b,), bool))

    def model_fn(x, t, c):
        return model.apply({"params": params}, x, t, c)

    x = diffusion.sample(model_fn, fast, (n * b, model.embed_dim), rng, cond, uncond=uncond,
                         guidance_scale=guidance_scale, method=method, var_type=var_type,
                         parameterization="x0", eps_sq_norm=eps_sq_norm, x0_range=x0_range)
    cands = scaling.image_inverse(x).reshape(n, b, -1)
    best = best_of_n(cands, batch["text_embedding"])
    return (best, cands) if return_candidates else best
