"""Prior metrics: how close sampled image embeddings are to the true ones.

For each caption: cos(sampled z_i, true z_i), against the baseline cos(z_t, true z_i) (feeding
the text embedding to the decoder directly, which the paper compares against). A prior is useful
when the first clearly beats the second. `evaluate_prior` runs any prior's sampler over an
evaluation set; `diffusion_prior_sampler` / `ar_prior_sampler` adapt our two priors.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"prior metrics: expected paired embeddings [N, D], got {a.shape} and "
                         f"{b.shape}")
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                       1e-12)


def prior_cosines(sampled_zi, true_zi, z_t) -> dict:
    """Means (and standard errors) of cos(sampled z_i, true z_i) and of cos(z_t, true z_i)."""
    s, t = _cos(sampled_zi, true_zi), _cos(z_t, true_zi)
    n = len(s)
    sem = (lambda v: float(v.std(ddof=1) / np.sqrt(n))) if n > 1 else (lambda v: float("nan"))
    return {"cos_sample_true": float(s.mean()), "cos_sample_true_sem": sem(s),
            "cos_text_true": float(t.mean()), "cos_text_true_sem": sem(t),
            "gain": float(s.mean() - t.mean()), "n": n}


def evaluate_prior(sample_fn: Callable, batches: Iterable[Mapping], seed: int = 0,
                   max_examples: int | None = None) -> dict:
    """Run `sample_fn(batch, rng) -> sampled z_i [B, D]` over batches holding "image_embedding"
    (true z_i) and "text_embedding" (z_t) plus whatever the sampler reads (tokens, token_mask,
    ...); returns `prior_cosines` over all examples (at most `max_examples`)."""
    import jax

    rng = jax.random.PRNGKey(seed)
    sampled, true, text = [], [], []
    n = 0
    for i, batch in enumerate(batches):
        for key in ("image_embedding", "text_embedding"):
            if key not in batch:
                raise KeyError(f"evaluate_prior: batch has no {key!r} (keys {sorted(batch)})")
        z = np.asarray(sample_fn(batch, jax.random.fold_in(rng, i)), np.float64)
        sampled.append(z)
        true.append(np.asarray(batch["image_embedding"], np.float64))
        text.append(np.asarray(batch["text_embedding"], np.float64))
        n += len(z)
        if max_examples is not None and n >= max_examples:
            break
    if not sampled:
        raise ValueError("evaluate_prior: the evaluation set gave no batches")
    cat = lambda xs: np.concatenate(xs, 0)[:max_examples]  # noqa: E731
    return prior_cosines(cat(sampled), cat(true), cat(text))


def prior_table(results: Mapping[str, dict]) -> str:
    """Markdown table of `prior_cosines` results, one row per prior (e.g. diffusion, AR)."""
    rows = ["| prior | n | cos(sampled z_i, z_i) | cos(z_t, z_i) baseline | gain |",
            "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['n']} | {r['cos_sample_true']:.4f} "
                    f"+- {r['cos_sample_true_sem']:.4f} | {r['cos_text_true']:.4f} "
                    f"+- {r['cos_text_true_sem']:.4f} | {r['gain']:+.4f} |")
    return "\n".join(rows)


def _device_batch(batch: Mapping, keys=("text_embedding", "token_mask", "tokens",
                                        "token_embeddings")) -> dict:
    import jax.numpy as jnp
    return {k: jnp.asarray(batch[k]) for k in keys if k in batch}


def diffusion_prior_sampler(model, params, *, schedule, scaling, **sample_kw) -> Callable:
    """`sample_fn(batch, rng)` for the diffusion prior (models.prior.sample_prior); sample_kw as
    for sample_prior (steps, guidance_scale, num_candidates, ...)."""
    from unclip_jax.models.prior import sample_prior

    def sample_fn(batch, rng):
        return sample_prior(model, params, _device_batch(batch), rng, schedule=schedule,
                            scaling=scaling, **sample_kw)
    return sample_fn


def ar_prior_sampler(model, params, codec, **sample_kw) -> Callable:
    """`sample_fn(batch, rng)` for the AR prior: sample tokens (models.ar_prior.sample_ar_prior,
    sample_kw: temperature, top_k, guidance_scale, text_scale, ...) and decode them with the
    codec (models.ar_prior.ARCodec)."""
    from unclip_jax.models.ar_prior import sample_ar_prior

    def sample_fn(batch, rng):
        tokens = sample_ar_prior(model, params, _device_batch(batch), rng, **sample_kw)
        return codec.decode(np.asarray(tokens))
    return sample_fn
