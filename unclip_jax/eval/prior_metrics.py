"""Prior metrics: how close sampled image embeddings are to the true ones.

For each caption: cos(sampled z_i, true z_i), against the baseline cos(z_t, true z_i) (feeding
the text embedding to the decoder directly, which the paper compares against). A prior is useful
when the first clearly beats the second. The priors are sampled through the Pipeline
(eval.sampling.sample_priors), by the evaluator and the main job's report alike.
"""
from __future__ import annotations

from typing import Mapping

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


def compare_priors(sampled: Mapping[str, np.ndarray], true_zi, z_t) -> dict:
    """`prior_cosines` for each prior's sampled z_i ({"diffusion": ..., "ar": ...}), all against
    the same true z_i and z_t."""
    return {name: prior_cosines(z, true_zi, z_t) for name, z in sampled.items()}


def prior_table(results: Mapping[str, dict]) -> str:
    """Markdown table of `prior_cosines` results, one row per prior (e.g. diffusion, AR)."""
    rows = ["| prior | n | cos(sampled z_i, z_i) | cos(z_t, z_i) baseline | gain |",
            "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['n']} | {r['cos_sample_true']:.4f} "
                    f"+- {r['cos_sample_true_sem']:.4f} | {r['cos_text_true']:.4f} "
                    f"+- {r['cos_text_true_sem']:.4f} | {r['gain']:+.4f} |")
    return "\n".join(rows)
