"""The evaluator's files: samples.npz, samples.png, the sweep plot, eval.json, TensorBoard
scalars, and the cached Inception statistics of the real images (reference_stats.npz)."""
from __future__ import annotations

import json
import math

import numpy as np

from unclip_jax import paths

PLOT_FILE = "fid_vs_guidance.png"


def load_reference(path: str, key: str) -> dict | None:
    """Cached real-image Inception statistics: our cache (checked against the evaluation set's
    key) or a precomputed (mu, sigma) npz, e.g. pytorch-fid's --save-stats."""
    from unclip_jax.eval.plan import EvalError
    if not paths.path(path).is_file():
        return None
    with paths.np_load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise EvalError(f"reference statistics {path} have no mu/sigma (have {f.files})")
        if "key" in f.files and str(f["key"]) != key:
            return None  # our cache, for another evaluation set: recompute
        out = {"mu": np.asarray(f["mu"], np.float64), "sigma": np.asarray(f["sigma"], np.float64)}
        if "features" in f.files:
            out["features"] = np.asarray(f["features"], np.float32)
        return out


def save_reference(path: str, key: str, real):
    """Cache `scores.RealInception` statistics and features under the evaluation set's key."""
    paths.save_npz(path, mu=real.mu, sigma=real.sigma, n=np.int64(len(real.features)), key=key,
             features=np.asarray(real.features, np.float32))


def write_samples(path: str, plan, samples):
    """samples.npz: per-example arrays at the main scale, plus each sweep scale's features."""
    rows, g0 = samples.rows, plan.scales[0]
    arrays = {"caption": np.asarray(samples.captions, dtype=str), "index": rows["index"],
              "position": rows["position"], "text_embedding": rows["text_embedding"],
              "true_image_embedding": rows["true_image_embedding"],
              "gen_clip": samples.gen_clip[g0]}
    for k in ("prior_diffusion", "prior_ar", "real_inception"):
        if k in rows:
            arrays[k] = rows[k]
    if samples.gen_inception:
        arrays["gen_inception"] = samples.gen_inception[g0]
    for g in plan.sweep:  # what each sweep entry was computed from
        arrays[f"gen_clip_g{g:g}"] = samples.gen_clip[g]
        if samples.gen_inception:
            arrays[f"gen_inception_g{g:g}"] = samples.gen_inception[g]
    if samples.images is not None:
        arrays["images"] = samples.images
    paths.save_npz(path, **arrays)


def write_grid(path: str, samples):
    """The first generated images, one caption each, in a square-ish grid."""
    from unclip_jax.images import from_uint8, save_grid
    cols = math.ceil(math.sqrt(len(samples.grid)))
    save_grid(from_uint8(samples.grid), path, cols, labels=samples.captions[:len(samples.grid)])


def write_sweep_plot(path: str, sweep: list[dict], inception: bool, n: int, step: int) -> str:
    """The sweep metric (FID with Inception, else CLIP-space FD) against the guidance scale;
    returns the metric's name."""
    from unclip_jax.images import plot_sweep
    metric = "fid" if inception else "clip_fd"
    label = "FID (Inception)" if inception else "CLIP-space FD"
    note = ("" if inception else
            "no Inception weights configured: Frechet distance of CLIP image embeddings")
    plot_sweep(sorted((e["guidance"], e[metric]) for e in sweep), path, label,
               f"{label} vs decoder guidance ({n} captions, step {step})", note)
    return metric


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str, result: dict):
    paths.write_text(path, json.dumps(result, indent=2, default=_json_default))


def flat_scalars(prefix: str, d: dict) -> dict:
    """Numbers of a nested dict as {"prefix/a/b": float}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flat_scalars(key, v))
        elif isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def write_tensorboard(path: str, result: dict):
    """eval.json's numbers as scalars at the decoder's checkpoint step."""
    import tempfile

    from unclip_jax.train.metrics import summary_writer_class
    local = tempfile.mkdtemp(prefix="unclip_jax_tb_") if paths.is_url(path) else path
    w = summary_writer_class()(local)
    step = int(result["step"])
    scalars = flat_scalars("eval", {"metrics": result["metrics"], "prior": result["prior"],
                                    "shapes": result["shapes_accuracy"] or {}})
    for e in result["guidance_sweep"]:
        for k, v in e.items():
            if k != "guidance":
                scalars[f"eval/sweep/{k}_g{e['guidance']:g}"] = float(v)
    for k, v in scalars.items():
        if math.isfinite(v):
            w.add_scalar(k, v, step)
    w.close()
    if local != path:   # object storage: the event file is uploaded whole
        import shutil
        paths.upload(local, path)
        shutil.rmtree(local, ignore_errors=True)
