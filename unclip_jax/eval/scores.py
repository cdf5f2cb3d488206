"""The evaluator's numbers from gathered `Samples` (process 0): image metrics at the main
guidance scale, prior cosines, the guidance sweep. A metric that can't be computed (e.g. too few
samples for the feature dimension) is NaN with a warning, so it doesn't lose the others."""
from __future__ import annotations

import dataclasses

import numpy as np

from unclip_jax.eval import metrics as M


@dataclasses.dataclass
class RealInception:
    """Inception statistics of the real images and, when known, their features (KID and
    precision-recall need them)."""
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None


def real_inception(samples, cached: dict | None) -> RealInception:
    """From the cached reference statistics when there are any, else from the features just
    computed; features: just computed, else cached, else None."""
    feats = samples.rows.get("real_inception")
    if feats is None and cached is not None:
        feats = cached.get("features")
    if cached is not None:
        return RealInception(cached["mu"], cached["sigma"], feats)
    return RealInception(*M.feature_statistics(feats), feats)


def _attempt(fn, name: str, warnings: list):
    try:
        return fn()
    except (ValueError, np.linalg.LinAlgError) as e:
        warnings.append(f"{name}: {e}")
        return float("nan")


def mean_cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) *
                                              np.linalg.norm(b, axis=1), 1e-12)).mean())


def image_metrics(plan, samples, real: RealInception | None, warnings: list) -> dict:
    """eval.json's "metrics": CLIP FD / score, FID / KID (with Inception), precision-recall."""
    g0, rows = plan.scales[0], samples.rows
    real_clip, text = rows["true_image_embedding"], rows["text_embedding"]
    gen_clip, gen_inc = samples.gen_clip[g0], samples.gen_inception.get(g0)
    res: dict = {}
    if plan.clip_fd:
        res["clip_fd"] = _attempt(lambda: M.fid_from_features(real_clip, gen_clip), "clip_fd",
                                  warnings)
    if plan.clip_score:
        res["clip_score"] = M.clip_score(gen_clip, text)
        res["clip_score_real"] = M.clip_score(real_clip, text)
        # The unclamped mean cosine too: CLIP score clamps at 0, which hides how far below
        # zero a weak model is.
        res["clip_cosine"] = mean_cosine(gen_clip, text)
        res["clip_cosine_real"] = mean_cosine(real_clip, text)
    if real is not None:
        if plan.fid:
            res["fid"] = _attempt(lambda: M.frechet_distance(
                real.mu, real.sigma, *M.feature_statistics(gen_inc)), "fid", warnings)
        if plan.kid and real.features is not None:
            sub = min(plan.kid_subset_size, len(real.features), samples.n)
            res["kid_subset_size"] = sub
            k = _attempt(lambda: M.kid(real.features, gen_inc, subset_size=sub,
                                       num_subsets=plan.kid_subsets), "kid", warnings)
            res.update(k if isinstance(k, dict) else {"kid_mean": k, "kid_std": k})
    if plan.precision_recall:
        use_inc = real is not None and real.features is not None
        real_f, gen_f = (real.features, gen_inc) if use_inc else (real_clip, gen_clip)
        pr = _attempt(lambda: M.precision_recall(real_f, gen_f, k=plan.pr_k), "precision_recall",
                      warnings)
        res.update(pr if isinstance(pr, dict) else {"precision": pr, "recall": pr})
        res["pr_features"] = "inception" if use_inc else "clip"
        res["pr_k"] = plan.pr_k
    return res


def prior_metrics(plan, samples) -> dict:
    """eval.json's "prior": eval.prior_metrics.compare_priors of the sampled z_i."""
    from unclip_jax.eval.prior_metrics import compare_priors
    rows = samples.rows
    return compare_priors({name: rows[f"prior_{name}"] for name in plan.priors},
                          rows["true_image_embedding"], rows["text_embedding"])


def sweep_metrics(plan, samples, real: RealInception | None, warnings: list) -> list[dict]:
    """eval.json's "guidance_sweep": FID (with Inception), CLIP FD and CLIP score per scale."""
    rows = samples.rows
    out = []
    for g in plan.sweep:
        e = {"guidance": g}
        if real is not None:
            e["fid"] = _attempt(lambda g=g: M.frechet_distance(
                real.mu, real.sigma, *M.feature_statistics(samples.gen_inception[g])),
                f"fid@{g}", warnings)
        e["clip_fd"] = _attempt(lambda g=g: M.fid_from_features(rows["true_image_embedding"],
                                                                samples.gen_clip[g]),
                                f"clip_fd@{g}", warnings)
        e["clip_score"] = M.clip_score(samples.gen_clip[g], rows["text_embedding"])
        out.append(e)
    return out
