"""The autoregressive prior: PCA + per-dimension quantisation of z_i, predicted token by token.

Codec (host side, numpy; `unclip_jax.models.pca`): z_i -> its first k PCA coordinates (ordered by
eigenvalue; paper k = 319 of 1024) -> `num_buckets` equal-mass buckets per coordinate. The token
sequence is [dot, pc_0, ..., pc_{k-1}] where `dot` is the quantised z_i . z_t. Decoding maps
tokens to bucket centres and inverts the PCA.

Model: a bidirectional text encoder over [caption tokens, z_t] (Table 3: 2048 wide, 24 deep),
projected to the latent decoder's width as a prefix of its causal sequence (Table 3: 1664 wide,
24 deep); the decoder predicts token j from the prefix and tokens < j. The caption (tokens and
z_t) is dropped to learned nulls at `drop_prob` in training so guidance is available.
Sampling: temperature / top-k, and the dot token drawn from the top half of its predicted
distribution, i.e. at or above the model's median for the caption (paper: a high z_i . z_t gave
better samples). With `kv_cache=True` (the default) the decoder keeps each layer's keys and
values (models.transformer, decode=True): the prefix runs once, then each token costs one
position; `kv_cache=False` re-runs the decoder over the whole sequence per token (the reference
the cached path is tested against: same tokens for the same rng).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.layers import Dense
from unclip_jax.models.prior import CaptionPrefix
from unclip_jax.models.transformer import Transformer
from unclip_jax.models.pca import PCA, PCAStats, Quantizer, fit_pca, fit_quantizer

Dtype = Any


# ------------------------------------------------------------------------------------- codec
@dataclasses.dataclass(frozen=True)
class ARCodec:
    pca: PCA
    quantizer: Quantizer        # over the first k PCA coordinates
    dot_quantizer: Quantizer    # over z_i . z_t (one dimension)

    @property
    def k(self) -> int:
        return self.quantizer.edges.shape[0]

    @property
    def num_buckets(self) -> int:
        return self.quantizer.num_buckets

    def encode(self, z_i: np.ndarray, z_t: np.ndarray) -> np.ndarray:
        """[B, D] x2 -> int32 [B, k + 1] = [dot bucket, PC buckets]."""
        dot = np.sum(np.asarray(z_i, np.float64) * np.asarray(z_t, np.float64), -1, keepdims=True)
        return np.concatenate([self.dot_quantizer.quantize(dot),
                               self.quantizer.quantize(self.pca.transform(z_i, self.k))], 1)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """[B, k + 1] (or [B, k] without the dot token) -> z_i [B, D]."""
        tokens = np.asarray(tokens)
        pcs = tokens[:, 1:] if tokens.shape[1] == self.k + 1 else tokens
        return self.pca.inverse_transform(self.quantizer.dequantize(pcs))

    def save(self, path: str) -> None:
        with open(path, "wb") as f:  # a file object: savez must not append ".npz" to path
            np.savez(f, mean=self.pca.mean, components=self.pca.components[:self.k],
                     eigenvalues=self.pca.eigenvalues, count=self.pca.count,
                     edges=self.quantizer.edges, centres=self.quantizer.centres,
                     dot_edges=self.dot_quantizer.edges, dot_centres=self.dot_quantizer.centres)

    @classmethod
    def load(cls, path: str) -> "ARCodec":
        from unclip_jax import paths
        with paths.np_load(path) as f:
            pca = PCA(f["mean"], f["components"], f["eigenvalues"], int(f["count"]))
            return cls(pca, Quantizer(f["edges"], f["centres"]),
                       Quantizer(f["dot_edges"], f["dot_centres"]))


def fit_codec(z_i: np.ndarray, z_t: np.ndarray, k: int, num_buckets: int = 1024) -> ARCodec:
    """PCA on z_i keeping k components, equal-mass buckets per kept coordinate and for z_i.z_t."""
    z_i = np.asarray(z_i, np.float64)
    if not 0 < k <= z_i.shape[1]:
        raise ValueError(f"config.model.pca_components {k} must be in [1, {z_i.shape[1]}]")
    pca = fit_pca(z_i)
    coords = pca.transform(z_i, k)
    dot = np.sum(z_i * np.asarray(z_t, np.float64), -1, keepdims=True)
    return ARCodec(pca, fit_quantizer(coords, num_buckets), fit_quantizer(dot, num_buckets))


def fit_codec_streaming(batches, dim: int, k: int, num_buckets: int = 1024,
                        max_rows: int = 262_144) -> ARCodec:
    """`fit_codec` of data streamed twice, each process reading its own part (a collective:
    every process calls it and gets the same codec). `batches()` yields this process's rows as
    (first global row, z_i [b, D], z_t [b, D]). Pass 1 accumulates the PCA statistics, merged
    over processes; pass 2 fits the buckets to the coordinates of every global row r with
    r % stride == 0, stride = ceil(rows / max_rows), gathered from all processes (quantiles need
    the values, not sums). Up to max_rows rows it equals fit_codec of all the data."""
    from unclip_jax.eval.gather import allgather_rows

    if not 0 < k <= dim:
        raise ValueError(f"config.model.pca_components {k} must be in [1, {dim}]")
    stats = PCAStats(dim)
    for _, z_i, _ in batches():
        stats.update(z_i)
    pca = stats.merged_over_processes().finalize()
    stride = max(1, -(-pca.count // int(max_rows)))
    coords, dots = [np.zeros((0, k), np.float32)], [np.zeros((0, 1), np.float64)]
    for start, z_i, z_t in batches():
        keep = (start + np.arange(len(z_i))) % stride == 0
        z_i = np.asarray(z_i, np.float64)[keep]
        coords.append(pca.transform(z_i, k))
        dots.append(np.sum(z_i * np.asarray(z_t, np.float64)[keep], -1, keepdims=True))
    coords = allgather_rows(np.concatenate(coords))
    # float64 travels as uint32 bit pairs (JAX without x64 would round it to float32).
    dots = np.ascontiguousarray(allgather_rows(np.concatenate(dots).view(np.uint32))).view(
        np.float64)
    return ARCodec(pca, fit_quantizer(coords, num_buckets), fit_quantizer(dots, num_buckets))


# ------------------------------------------------------------------------------------- model
class ARPrior(nn.Module):
    """`__call__(tokens [B, T], cond)` -> logits [B, T, num_buckets]: logits[:, j] predicts
    tokens[:, j] from the prefix and tokens[:, :j] (T = k + 1). cond as for DiffusionPrior."""
    num_buckets: int
    num_tokens: int
    text_ctx: int
    vocab_size: int = 0
    enc_width: int = 256
    enc_depth: int = 2
    enc_heads: int = 4
    dec_width: int = 256
    dec_depth: int = 2
    dec_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype)
        self.caption = CaptionPrefix(self.enc_width, self.text_ctx, self.vocab_size, **kw)
        init = lambda s: nn.with_logical_partitioning(nn.initializers.normal(0.01), s)  # noqa
        self.enc_pos = self.param("enc_positional_embedding", init((None, "embed")),
                                  (self.text_ctx + 1, self.enc_width), jnp.float32)
        self.encoder = Transformer(self.enc_width, self.enc_depth, self.enc_heads, self.mlp_ratio,
                                   causal=False, dropout=self.dropout, final_norm=True,
                                   remat=self.remat, **kw)
        self.prefix_proj = Dense(self.dec_width, axes=("embed", "mlp"), **kw)
        self.token_embedding = self.param(
            "token_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            ("vocab", "embed")),
            (self.num_buckets, self.dec_width), jnp.float32)
        self.dec_pos = self.param("dec_positional_embedding", init((None, "embed")),
                                  (self.text_ctx + self.num_tokens, self.dec_width),
                                  jnp.float32)
        self.decoder = Transformer(self.dec_width, self.dec_depth, self.dec_heads, self.mlp_ratio,
                                   causal=True, dropout=self.dropout, final_norm=True,
                                   remat=self.remat, **kw)
        self.head = Dense(self.num_buckets, axes=("embed", "vocab"), **kw)

    def prefix(self, cond, train: bool = False):
        """Encoded caption + z_t at decoder width [B, L + 1, Wd] and its key mask."""
        tok, zt, mask = self.caption(cond)
        x = jnp.concatenate([tok, zt[:, None]], 1) + self.enc_pos[None].astype(self.dtype)
        mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], 1), bool)], 1)
        x = self.encoder(x.astype(self.dtype), mask, train)
        return self.prefix_proj(x), mask

    def logits(self, prefix, mask, tokens, train: bool = False):
        b, t = tokens.shape
        if t != self.num_tokens:
            raise ValueError(f"ar prior: {t} tokens, model expects {self.num_tokens} "
                             "(config.model.pca_components + 1)")
        emb = jnp.take(self.token_embedding, tokens[:, :-1], axis=0).astype(self.dtype)
        x = jnp.concatenate([prefix.astype(self.dtype), emb], 1) + self.dec_pos[None].astype(
            self.dtype)
        mask = jnp.concatenate([mask, jnp.ones((b, t - 1), bool)], 1)
        x = self.decoder(x, mask, train)
        p = prefix.shape[1]
        return self.head(x[:, p - 1:]).astype(jnp.float32)   # positions predicting tokens 0..T-1

    def __call__(self, tokens, cond, train: bool = False):
        prefix, mask = self.prefix(cond, train)
        return self.logits(prefix, mask, tokens, train)

    # -- incremental decoding (key/value cache; see sample_ar_prior) -------------------------
    def create_cache(self, prefix, full_mask):
        """Called under jax.eval_shape with "cache" mutable: makes the cache's variables."""
        x = jnp.zeros((prefix.shape[0], full_mask.shape[1], self.dec_width), self.dtype)
        return self.decoder(x, full_mask, decode=True)

    def decode_prefix(self, prefix, full_mask):
        """Fill the cache with the prefix; logits [B, num_buckets] for token 0."""
        x = prefix.astype(self.dtype) + self.dec_pos[None, :prefix.shape[1]].astype(self.dtype)
        x = self.decoder(x, full_mask, decode=True)
        return self.head(x[:, -1]).astype(jnp.float32)

    def decode_token(self, token, j, full_mask):
        """Append token j - 1 ([B] int) to the cache; logits [B, num_buckets] for token j."""
        pos = full_mask.shape[1] - self.num_tokens + j   # = prefix length + j - 1
        x = (jnp.take(self.token_embedding, token, axis=0).astype(self.dtype)
             + jax.lax.dynamic_index_in_dim(self.dec_pos, pos, keepdims=False).astype(self.dtype))
        x = self.decoder(x[:, None], full_mask, decode=True)
        return self.head(x[:, 0]).astype(jnp.float32)


def ar_loss(model, params, batch, rng, scaling_text=None, drop_prob: float = 0.1,
            train: bool = True):
    """Mean cross-entropy over the k + 1 tokens of batch["ar_tokens"]; caption dropped at
    drop_prob. z_t is fed multiplied by `scaling_text` (e.g. sqrt(dim)) if given."""
    r_d, r_do = jax.random.split(rng)
    cond = _cond(batch, scaling_text)
    cond["drop"] = jax.random.bernoulli(r_d, drop_prob, (batch["ar_tokens"].shape[0],))
    logits = model.apply({"params": params}, batch["ar_tokens"], cond, train=train,
                         rngs={"dropout": r_do})
    target = batch["ar_tokens"]
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
    acc = jnp.mean(jnp.argmax(logits, -1) == target)
    return jnp.mean(nll), {"dot_xent": jnp.mean(nll[:, 0]), "pc_xent": jnp.mean(nll[:, 1:]),
                           "accuracy": acc}


def _cond(batch, text_scale=None):
    zt = batch["text_embedding"].astype(jnp.float32)
    cond = {"z_t": zt * (1.0 if text_scale is None else text_scale),
            "token_mask": batch["token_mask"]}
    for k in ("tokens", "token_embeddings"):
        if k in batch:
            cond[k] = batch[k]
    return cond


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0):
    """Temperature then top-k (0 = off) on [..., V] logits."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


def upper_half(logits):
    """Restrict a distribution over ordered buckets to its upper half of probability mass: the
    buckets from the one holding the median up (the paper's dot-token sampling; buckets are
    ordered by value, so this is "a z_i . z_t above the model's median for this caption")."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    return jnp.where(cdf >= 0.5, logits, -jnp.inf)


def sample_ar_prior(model: ARPrior, params, batch, rng, *, temperature: float = 1.0,
                    top_k: int = 0, dot_top_half: bool = True, guidance_scale: float = 1.0,
                    text_scale=None, kv_cache: bool = True):
    """Token sequences [B, k + 1] for the captions in `batch` (text_embedding, token_mask,
    tokens or token_embeddings). Decode with ARCodec.decode. One lax.fori_loop over tokens;
    kv_cache=False re-runs the decoder over the sequence for each token (the reference)."""
    cond = _cond(batch, text_scale)
    b = cond["z_t"].shape[0]
    t_len = model.num_tokens
    guided = guidance_scale != 1.0
    cond["drop"] = jnp.zeros((b,), bool)
    if guided:  # conditional and null halves in one doubled batch
        cond = jax.tree.map(lambda x: jnp.concatenate([x, x], 0), cond)
        cond["drop"] = jnp.arange(2 * b) >= b
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
    prefix, mask = apply(ARPrior.prefix, cond)
    double = (lambda x: jnp.concatenate([x, x], 0)) if guided else (lambda x: x)  # noqa: E731

    def pick(j, lg):
        """Token j [B] from the logits for it (both halves when guided)."""
        if guided:
            lg = lg[b:] + guidance_scale * (lg[:b] - lg[b:])
        lg = filter_logits(lg, temperature, top_k)
        if dot_top_half:
            lg = jnp.where(j == 0, upper_half(lg), lg)
        return jax.random.categorical(jax.random.fold_in(rng, j), lg, axis=-1).astype(jnp.int32)

    tokens = jnp.zeros((b, t_len), jnp.int32)
    if not kv_cache:
        def body(j, tokens):
            return tokens.at[:, j].set(pick(j, apply(ARPrior.logits, prefix, mask,
                                                     double(tokens))[:, j]))

        return jax.lax.fori_loop(0, t_len, body, tokens)

    full_mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], t_len - 1), bool)], 1)
    shapes = jax.eval_shape(lambda: model.apply({"params": params}, prefix, full_mask,
                                                method=ARPrior.create_cache,
                                                mutable=["cache"])[1]["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def step(method, cache, *a):
        lg, v = model.apply({"params": params, "cache": cache}, *a, method=method,
                            mutable=["cache"])
        return lg, v["cache"]

    lg, cache = step(ARPrior.decode_prefix, cache, prefix, full_mask)

    def body(j, carry):   # token j from its logits, then the logits for token j + 1
        tokens, lg, cache = carry
        s = pick(j, lg)
        lg, cache = step(ARPrior.decode_token, cache, double(s), j + 1, full_mask)
        return tokens.at[:, j].set(s), lg, cache

    tokens, lg, _ = jax.lax.fori_loop(0, t_len - 1, body, (tokens, lg, cache))
    return tokens.at[:, t_len - 1].set(pick(t_len - 1, lg))
