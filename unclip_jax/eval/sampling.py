"""Sampling for evaluation, one implementation for the evaluator (unclip_jax.evaluate) and the
main job's report (recipes/shapes.py): images for captions (rounded to uint8 as a PNG would be,
before any feature is taken), each prior's z_i for captions, the shapes pixel check of sampled
prompts and the prior cosines of sampled z_i.

Calls are padded to one batch size (the last row repeated) so every call compiles once."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Seed offsets of the priors' own draws: not the image sampling's seed, nor each other's.
PRIOR_SEED_OFFSET = {"diffusion": 1_000_003, "ar": 2_000_003}


def pad_rows(xs: Sequence, size: int) -> list:
    """Repeat the last row up to `size`, so every call compiles for one batch shape."""
    return list(xs) + [xs[-1]] * (size - len(xs))


def pad_array(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) >= size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)], 0)


def sample_images(pipe, captions: Sequence[str], *, seed: int, settings, size: int) -> np.ndarray:
    """pipe.text_to_image for the captions (padded to `size` rows) as uint8 [b, H, W, 3]."""
    from unclip_jax.images import to_uint8
    out = pipe.text_to_image(pad_rows(captions, size), seed=seed, settings=settings)
    return to_uint8(out["images"][:len(captions)])


def sample_priors(pipe, captions: Sequence[str], *, seed: int, settings, priors: Sequence[str],
                  size: int) -> dict[str, np.ndarray]:
    """Sampled z_i [b, D] of each named prior ("diffusion", "ar") for the captions."""
    padded = pad_rows(captions, size)
    return {name: pipe.sample_prior(padded, seed=seed + PRIOR_SEED_OFFSET[name],
                                    settings=dataclasses.replace(settings, prior=name))
            [:len(captions)] for name in priors}


def check_prompts(pipe, prompts: Sequence[str], *, seed: int, settings,
                  batch_size: int = 64) -> tuple[dict, np.ndarray]:
    """Sample one image per prompt and read colour and shape from its pixels
    (eval.shapes_accuracy): (the accuracy dict, uint8 images). The batch starting at prompt i
    is seeded seed + i, as the evaluator seeds a batch by its first position."""
    from unclip_jax.eval.shapes_accuracy import merge, shapes_accuracy
    prompts = list(prompts)
    size = min(batch_size, len(prompts))
    parts, images = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        imgs = sample_images(pipe, chunk, seed=seed + i, settings=settings, size=size)
        parts.append(shapes_accuracy(imgs, chunk))
        images.append(imgs)
    return merge(parts), np.concatenate(images)


def prior_comparison(pipe, captions: Sequence[str], true_zi, z_t, *, seed: int, settings,
                     priors: Sequence[str], batch_size: int = 128) -> dict:
    """eval.prior_metrics.compare_priors of each prior's z_i sampled for the captions, against
    their true z_i and z_t (the batch starting at row i seeded seed + i)."""
    from unclip_jax.eval.prior_metrics import compare_priors
    captions = list(captions)
    size = min(batch_size, len(captions))
    parts = [sample_priors(pipe, captions[i:i + batch_size], seed=seed + i, settings=settings,
                           priors=priors, size=size) for i in range(0, len(captions), batch_size)]
    sampled = {name: np.concatenate([p[name] for p in parts], 0) for name in priors}
    return compare_priors(sampled, true_zi, z_t)
