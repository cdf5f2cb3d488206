"""Stage `diffusion_prior`: train the diffusion prior on (caption, z_t, z_i) batches.

Config (experiments/prior_shapes.py, experiments/paper/diffusion_prior.py):
  model.{embed_dim, width, depth, heads, text_ctx, vocab_size (0: use token_embeddings,
         text_dim wide), mlp_ratio, dropout, drop_prob}
  model.scale_mode "fixed" (model.scale, paper 17.2) | "standardize" (model.stats_path, an npz
         from models.prior.save_embedding_stats; written from the cache's train split if absent)
  diffusion.{schedule, num_timesteps}
  diffusion.var_type "fixed_small" (default) | "fixed_large" | "analytic": the variance the prior
         samples with (SampleSettings.prior_var_type="config"); "analytic" (the paper's) also
         estimates its statistic from diffusion.analytic_examples (default 4096) training
         examples at the end of training (stages/prior_variance.py)
  data.name "embed_cache" (an unclip_jax.data config; tokenizer.dir gives the eos id for the
         token mask) | "synthetic" (data.{num_examples, seed}: fixed random pairs, for tests)
Batches: image_embedding, text_embedding, tokens or token_embeddings, token_mask.
"""
from __future__ import annotations

import functools

import numpy as np

from unclip_jax import diffusion
from unclip_jax.models.prior import DiffusionPrior, EmbeddingScaling, prior_loss, \
    save_embedding_stats
from unclip_jax.stages.base import Stage


def diffusion_config(**kw):
    """`config.diffusion` of the diffusion prior stage."""
    return diffusion.diffusion_config(**dict(dict(
        var_type="fixed_small",     # sampling variance: "fixed_small" | "fixed_large" | "analytic"
        analytic_examples=4096,     # examples the Analytic-DPM statistic is estimated from
    ), **kw))


# ---------------------------------------------------------------------------- synthetic pairs
def synthetic_pairs(num: int, dim: int, ctx: int, vocab: int, seed: int = 0,
                    text_dim: int = 0) -> dict[str, np.ndarray]:
    """Fixed (caption, z_t, z_i) examples where z_i is a nonlinear function of z_t, and the
    caption tokens are a function of z_t too (its 4 largest coordinates). Unit-norm embeddings."""
    rng = np.random.default_rng([seed, 7])
    z_t = rng.standard_normal((num, dim))
    z_t /= np.linalg.norm(z_t, axis=1, keepdims=True)
    w1 = rng.standard_normal((dim, 2 * dim)) * 2.0
    w2 = rng.standard_normal((2 * dim, dim))
    z_i = np.tanh(z_t @ w1 * 2.0) @ w2
    z_i /= np.linalg.norm(z_i, axis=1, keepdims=True)
    words = np.argsort(-z_t, axis=1)[:, :4] % max(vocab - 3, 1) + 3   # 0..2: pad, bos, eos
    tokens = np.zeros((num, ctx), np.int32)
    n = min(4, ctx - 2)
    tokens[:, 0], tokens[:, 1:1 + n], tokens[:, 1 + n] = 1, words[:, :n], 2
    mask = np.arange(ctx)[None] < n + 2
    out = {"image_embedding": z_i.astype(np.float32), "text_embedding": z_t.astype(np.float32),
           "tokens": tokens, "token_mask": np.broadcast_to(mask, (num, ctx)).copy()}
    if text_dim:
        proj = rng.standard_normal((dim, text_dim)) / np.sqrt(dim)
        out["token_embeddings"] = np.broadcast_to((z_t @ proj)[:, None], (num, ctx, text_dim)
                                                  ).astype(np.float32)
    return out


class ArrayIterator:
    """Batches of in-memory arrays, reshuffled per epoch; example order is a pure function of
    (seed, step), so the state is the step."""

    def __init__(self, arrays: dict, global_batch: int, process_index: int, local_batch: int,
                 seed: int, postprocess=None):
        self.arrays, self.g, self.lb = arrays, global_batch, local_batch
        self.offset, self.seed, self.step = process_index * local_batch, seed, 0
        self.n = len(next(iter(arrays.values())))
        self.postprocess = postprocess

    def __iter__(self):
        return self

    def __next__(self):
        pos = self.step * self.g + self.offset + np.arange(self.lb)
        epoch, within = pos // self.n, pos % self.n
        idx = np.array([np.random.default_rng([self.seed, int(e)]).permutation(self.n)[w]
                        for e, w in zip(epoch, within)])
        self.step += 1
        out = {k: v[idx] for k, v in self.arrays.items()}
        return self.postprocess(out) if self.postprocess else out

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])

    def seek(self, examples, process_count):
        self.step = int(examples) // self.g  # the order does not depend on the count

    def stats(self):
        return {}


def token_mask_from_tokens(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """True up to and including the first eos (pad may equal eos, as in CLIP)."""
    is_eos = tokens == eos_id
    first = np.where(is_eos.any(1), is_eos.argmax(1), tokens.shape[1] - 1)
    return np.arange(tokens.shape[1])[None] <= first[:, None]


def check_eos(tokens: np.ndarray, eos_id: int, tokenizer_dir: str) -> None:
    """Every cached caption ends with the tokenizer's eos (unclip_jax.data.tokenizer keeps it
    when it truncates): rows without it were written by another tokenizer."""
    missing = int((~(np.asarray(tokens) == eos_id).any(1)).sum())
    if missing:
        raise ValueError(f"{missing} of {len(tokens)} cached captions have no eos id {eos_id} of "
                         f"the tokenizer in {tokenizer_dir!r} (config.tokenizer.dir): the cache "
                         f"was written by another tokenizer")


def cache_batch(eos_id: int, keys, b: dict, tokenizer_dir: str = "") -> dict:
    """An embedding-cache batch -> the priors': `keys` only, token_mask from the tokens' eos."""
    out = {k: b[k] for k in keys if k in b and k != "token_mask"}
    check_eos(b["tokens"], eos_id, tokenizer_dir)
    out["token_mask"] = token_mask_from_tokens(np.asarray(b["tokens"]), eos_id)
    return out


def prior_data(config, keys, *, split, process_index, process_count, local_batch_size, seed,
               postprocess=None):
    """The batch source shared by both prior stages (synthetic or embed_cache); `postprocess`
    runs last on each batch."""
    d, m = config.data, config.model
    if d.name == "synthetic":
        arrays = synthetic_pairs(int(d.num_examples), int(m.embed_dim), int(m.text_ctx),
                                 int(m.vocab_size) or 64, int(d.seed),
                                 int(m.text_dim))
        arrays = {k: v for k, v in arrays.items() if k in keys}
        return ArrayIterator(arrays, int(config.train.batch_size), process_index,
                             local_batch_size, seed, postprocess)
    if d.name != "embed_cache":
        raise ValueError(f"config.data.name {d.name!r}: the prior stages read 'embed_cache' "
                         "or 'synthetic'")
    from unclip_jax.data import make_iterator
    from unclip_jax.data.tokenizer import Tokenizer

    eos = Tokenizer.load(str(config.tokenizer.dir)).eos_id
    fields = tuple(k for k in keys if k != "token_mask")
    if "tokens" not in fields:
        fields += ("tokens",)

    def to_prior(b):
        b = cache_batch(eos, keys, b, str(config.tokenizer.dir))
        return postprocess(b) if postprocess else b
    return make_iterator(d, split=split, process_index=process_index,
                         process_count=process_count, local_batch_size=local_batch_size,
                         seed=seed, fields=fields, postprocess=to_prior)


def batch_keys(config) -> tuple[str, ...]:
    text = "tokens" if int(config.model.vocab_size) > 0 else "token_embeddings"
    return ("image_embedding", "text_embedding", text, "token_mask")


@functools.lru_cache(maxsize=8)
def _scaling(mode: str, scale: float, stats_path: str, clamp: float) -> EmbeddingScaling:
    if mode == "fixed":
        return EmbeddingScaling.fixed(scale)
    return EmbeddingScaling.from_stats(stats_path, clamp)


def scaling_from_config(config) -> EmbeddingScaling:
    m = config.model
    mode = str(m.scale_mode)
    if mode not in ("fixed", "standardize"):
        raise ValueError(f"config.model.scale_mode {mode!r} must be 'fixed' or 'standardize'")
    path = str(m.stats_path)
    from unclip_jax.distributed import write_once, written
    if mode == "standardize" and not written(path):
        if config.data.name != "embed_cache":
            raise ValueError(f"config.model.stats_path {path!r} does not exist")
        from unclip_jax.data import cache
        cdir = str(config.data.cache_dir)
        write_once(path, lambda tmp: save_embedding_stats(
            tmp, cache.load_field(cdir, "train", "image_embedding"),
            cache.load_field(cdir, "train", "text_embedding")))
    return _scaling(mode, float(m.scale), path, float(m.clamp))


def schedule_from_config(config):
    dc = config.diffusion
    return diffusion.make_schedule(str(dc.schedule),
                                   int(dc.num_timesteps))


def build_prior(m) -> DiffusionPrior:
    return DiffusionPrior(int(m.embed_dim), int(m.width), int(m.depth), int(m.heads),
                          int(m.text_ctx), int(m.vocab_size),
                          float(m.mlp_ratio), float(m.dropout),
                          bool(m.remat), np.dtype(str(m.dtype)))


class DiffusionPriorStage(Stage):
    name = "diffusion_prior"

    def validate(self, config):
        m = config.model
        for f in ("embed_dim", "width", "depth", "heads", "text_ctx"):
            if f not in m:
                raise ValueError(f"config.model.{f} is required by the diffusion_prior stage")
        if int(m.width) % int(m.heads):
            raise ValueError(f"config.model.width {m.width} not divisible by heads {m.heads}")
        if int(m.vocab_size) <= 0 and int(m.text_dim) <= 0:
            raise ValueError("config.model: set vocab_size (token ids) or text_dim (token "
                             "encodings from the cache)")
        if not 0.0 <= float(m.drop_prob) < 1.0:
            raise ValueError(f"config.model.drop_prob must be in [0, 1), got {m.drop_prob}")
        from unclip_jax.stages.prior_variance import DEFAULT_EXAMPLES, configured_var_type
        configured_var_type(config)
        n = config.diffusion.get("analytic_examples", DEFAULT_EXAMPLES)  # older configs lack it
        if int(n) < 1:
            raise ValueError(f"config.diffusion.analytic_examples must be >= 1, got {n}")

    def build_model(self, config):
        return build_prior(config.model)

    def example_batch(self, config, batch_size):
        m = config.model
        d, ctx = int(m.embed_dim), int(m.text_ctx)
        b = {"image_embedding": np.zeros((batch_size, d), np.float32),
             "text_embedding": np.zeros((batch_size, d), np.float32),
             "token_mask": np.ones((batch_size, ctx), bool)}
        if int(m.vocab_size) > 0:
            b["tokens"] = np.zeros((batch_size, ctx), np.int32)
        else:
            b["token_embeddings"] = np.zeros((batch_size, ctx, int(m.text_dim)), np.float32)
        return b

    def init(self, model, rng, batch):
        from unclip_jax.models.prior import make_cond
        cond = make_cond(batch, EmbeddingScaling.fixed(1.0))
        cond["drop"] = np.zeros((batch["image_embedding"].shape[0],), bool)
        t = np.zeros((batch["image_embedding"].shape[0],), np.int32)
        return model.init({"params": rng}, batch["image_embedding"], t, cond)

    def loss(self, model, params, batch, rng, config):
        return prior_loss(model, params, batch, rng, schedule_from_config(config),
                          scaling_from_config(config), float(config.model.drop_prob))

    def make_data(self, config, *, split, process_index, process_count, local_batch_size, seed):
        return prior_data(config, batch_keys(config), split=split, process_index=process_index,
                          process_count=process_count, local_batch_size=local_batch_size,
                          seed=seed)

    def after_training(self, config, workdir, bundle, state, step):
        from unclip_jax.stages import prior_variance
        if prior_variance.configured_var_type(config) == "analytic":
            prior_variance.estimate(config, workdir, bundle, state.ema_params, step,
                                    schedule=schedule_from_config(config),
                                    scaling=scaling_from_config(config))
