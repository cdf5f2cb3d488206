"""Evaluate a trained unCLIP run: sample for the captions of an evaluation set and score the samples.

  python -m unclip_jax.evaluate --workdir=runs/shapes --config=experiments/eval/shapes.py \
      [--out=DIR] [--config.protocol.num_samples=256] [--config.inception_weights=inc.npz]

`--workdir` is the main job's workdir (stages clip/, diffusion_prior/, ar_prior/, decoder/,
upsampler/; EMA weights); `config.stages.<name>` overrides single stage directories (then the
workdir may hold nothing). Output (default `<workdir>/eval/<config.name>`, so TensorBoard on the
run shows it too):
  eval.json          every metric below, the settings, checkpoint steps, counts, timings
  samples.npz        per caption: caption, index, text_embedding (z_t), true_image_embedding
                     (CLIP z_i of the real image), prior_diffusion / prior_ar (sampled z_i),
                     gen_clip / real_clip (CLIP image embeddings), gen_inception / real_inception
                     (when Inception runs), images (uint8, with config.save_images)
  samples.png        the first generated images (grid, one caption each, captions in samples.txt)
  tensorboard/       the scalars of eval.json, step = the decoder's checkpoint step
  fid_vs_guidance.png  with config.guidance_sweep: FID (or CLIP-space FD when no Inception weights
                     are configured; the plot says which) against the decoder guidance scale
  reference_stats.npz  Inception statistics (and features) of the real images, reused on re-runs
                     of the same evaluation set (or config.reference_stats names the file)

Metrics (config.metrics selects):
  fid / kid          FID and KID with the FID Inception (eval.inception) from the local file
                     config.inception_weights; nothing is downloaded, a missing file is an error.
                     fid="auto": only when inception_weights is set.
  clip_fd            Frechet distance between CLIP image embeddings (the run's own CLIP) of the
                     generated and the real images
  clip_score         100 * mean max(cos(CLIP(generated image), CLIP(caption)), 0); also reported
                     for the real images (clip_score_real) as the reachable level
  precision_recall   Kynkaanniemi et al. on Inception features when Inception runs, else on CLIP
                     image embeddings (eval.json says which: pr_features)
  prior              cos(sampled z_i, true z_i) against cos(z_t, true z_i) for the diffusion prior
                     and (when the run has one) the AR prior, true z_i = CLIP of the real image
  shapes_accuracy    colour / shape / binding accuracy from pixels (built-in shapes data only)

Every generated image is rounded to uint8 (as a PNG would be) before any feature is taken, so the
saved images reproduce the numbers exactly.

Devices and processes: the batch of each sampling call is sharded over this process's devices
(a data mesh of its local devices); with several processes (`--coordinator_address`, or a
detected cluster) each process evaluates its own slice of the captions (its share of the source,
interleaved) and per-example features are gathered on process 0 with
`multihost_utils.process_allgather` (rows padded to the largest slice, then trimmed); only
process 0 computes the metrics and writes files.

Bad input (missing workdir or stage, missing weights file, an empty evaluation set, unknown
sampling fields) is reported in one line (exit code 2) before anything is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: XLA:CPU flags and the allocator


import numpy as np

from unclip_jax.images import from_uint8, plot_sweep, to_uint8
from unclip_jax.stages import UNCLIP_STAGES as STAGE_KEYS

PLOT_FILE = "fid_vs_guidance.png"


class EvalError(ValueError):
    """Bad evaluation input; the CLI prints it in one line and exits with code 2."""


# ------------------------------------------------------------------------------------- config
def sample_settings(config):
    """SampleSettings from config.sampling (its fields plus batch_size); unknown fields are an
    error rather than silently ignored (a misspelt guidance would change every number)."""
    from unclip_jax.inference import SampleSettings
    fields = {f.name for f in dataclasses.fields(SampleSettings)}
    given = {k: v for k, v in config.sampling.items() if k != "batch_size"}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise EvalError(f"config.sampling has unknown fields {unknown}; SampleSettings fields: "
                        f"{sorted(fields)} (plus batch_size)")
    return SampleSettings(**given)


def _inception_metric(config, name: str) -> bool:
    """metrics.fid / metrics.kid: True, False or "auto" (= when inception_weights is set); the
    strings "true" / "false" too, as a str field takes them from the command line."""
    v = config.metrics.get(name, "auto")
    if isinstance(v, str):
        v = v.strip().lower()
        if v not in ("auto", "true", "false"):
            raise EvalError(f"config.metrics.{name} must be true, false or auto, got {v!r}")
        if v != "auto":
            return v == "true"
        return bool(config.get("inception_weights", ""))
    return bool(v)


def _wants_inception(config) -> bool:
    return _inception_metric(config, "fid") or _inception_metric(config, "kid")


def _check_config(config):
    n = int(config.protocol.num_samples)
    if n <= 0:
        raise EvalError(f"config.protocol.num_samples is {n}: the evaluation set is empty")
    if int(config.sampling.batch_size) <= 0:
        raise EvalError("config.sampling.batch_size must be positive")
    for g in config.get("guidance_sweep", ()) or ():
        if not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0):
            raise EvalError(f"config.guidance_sweep holds {g!r}; scales must be positive numbers")
    if _wants_inception(config) and not config.get("inception_weights", ""):
        raise EvalError("FID/KID requested (config.metrics.fid / kid) but config.inception_weights "
                        "is empty: point it at pytorch-fid's pt_inception-2015-12-05 weights "
                        "(.pth or converted .npz); nothing is downloaded")
    order = config.protocol.get("order", "first")
    if order not in ("first", "shuffled", "coco_draw"):
        raise EvalError(f"config.protocol.order must be first, shuffled or coco_draw, got {order!r}")


# ---------------------------------------------------------------------------------- pipeline
def _stage_dirs(config, workdir: str) -> dict | None:
    """Stage directories from config.stages overriding <workdir>/<stage>; None when nothing is
    overridden (then Pipeline.from_workdir, with its own messages, does the work)."""
    stages = config.get("stages", None)
    given = {k: str(v) for k, v in (stages.items() if stages else []) if v}
    if not given:
        return None
    unknown = sorted(set(given) - set(STAGE_KEYS))
    if unknown:
        raise EvalError(f"config.stages has unknown keys {unknown}; use {list(STAGE_KEYS)}")
    out = {}
    for k in STAGE_KEYS:
        if k in given:
            dirs = [d.strip() for d in given[k].split(",") if d.strip()]
            for d in dirs:
                if not os.path.isdir(os.path.join(d, "checkpoints")):
                    raise FileNotFoundError(f"config.stages.{k}: {d} has no checkpoints/ "
                                            "(not a trained stage workdir)")
            out[k] = dirs if k == "upsampler" else dirs[0]
        elif os.path.isdir(os.path.join(workdir, k, "checkpoints")):
            out[k] = [os.path.join(workdir, k)] if k == "upsampler" else os.path.join(workdir, k)
    for need in ("clip", "decoder"):
        if need not in out:
            raise FileNotFoundError(f"no trained '{need}' stage: set config.stages.{need} or use "
                                    f"a workdir with {need}/checkpoints ({workdir})")
    if "diffusion_prior" not in out and "ar_prior" not in out:
        raise FileNotFoundError("no trained prior: set config.stages.diffusion_prior or "
                                "config.stages.ar_prior, or use a workdir that has one")
    return out


def _mesh():
    """A data mesh over this process's devices (each process samples its own captions), or
    None on one device. One process: the same as pipeline.default_mesh()."""
    import jax

    from unclip_jax import parallel
    from unclip_jax.inference import default_mesh
    if jax.local_device_count() <= 1:
        return None
    if jax.process_count() == 1:
        return default_mesh()
    return parallel.make_mesh({"data": -1}, devices=jax.local_devices())


def load_pipeline(config, workdir: str):
    from unclip_jax.inference import Pipeline
    dirs = _stage_dirs(config, workdir)
    ema = bool(config.get("ema", True))
    if dirs is None:
        return Pipeline.from_workdir(workdir, ema=ema, mesh=_mesh())
    return Pipeline.from_stage_dirs(clip=dirs["clip"], decoder=dirs["decoder"],
                                    prior=dirs.get("diffusion_prior"),
                                    ar_prior=dirs.get("ar_prior"),
                                    upsamplers=dirs.get("upsampler", []), ema=ema, mesh=_mesh())


def output_resolution(pipe) -> int:
    last = pipe.upsamplers[-1] if pipe.upsamplers else pipe.decoder
    return int(last.config.model.image_size)


# -------------------------------------------------------------------------------- eval set
def data_config(config, pipe, resolution: int):
    """The evaluation data: config.data, or with data_source="run" the dataset the run's CLIP
    trained on (the main job gives every image stage the same source; for shapes that is the
    built-in dataset, whose test split is held out)."""
    if config.get("data_source", "config") == "run":
        d = pipe.clip.config.data.copy_and_resolve_references()
    else:
        d = config.data.copy_and_resolve_references()
    with d.unlocked():
        d.resolution = int(resolution)
    return d


def _local_quota(n: int, pi: int, pc: int) -> int:
    return len(range(pi, n, pc))


def eval_batches(config, dcfg, batch_size: int, pi: int, pc: int):
    """This process's share of the evaluation set in batches: {"caption": list[str], "image":
    float32 [b, R, R, 3] in [-1, 1], "index": example ids, "position": rows' positions in the
    global set (unique: they seed the sampling)}.

    order "first": the first num_samples examples of the split (process p reads global
    positions p, p + P, ...; same set for any process count); "shuffled": a seeded random
    subset; "coco_draw": eval.coco.draw_captions over a tfds split (distinct images, one random
    caption each, the paper's zero-shot protocol)."""
    p = config.protocol
    n, order = int(p.num_samples), p.get("order", "first")
    if order == "coco_draw":
        yield from _coco_draw_batches(config, dcfg, batch_size, pi, pc)
        return
    from unclip_jax.data import make_iterator
    quota = _local_quota(n, pi, pc)
    if quota == 0:
        return
    it = make_iterator(dcfg, split=str(p.split), process_index=pi, process_count=pc,
                       local_batch_size=batch_size, seed=int(p.get("caption_seed", 0)),
                       fields=("image", "caption", "index"), shuffle=order == "shuffled",
                       num_epochs=1, drop_remainder=False)
    done = 0
    for batch in it:
        take = min(len(batch["caption"]), quota - done)
        pos = pi + pc * np.arange(done, done + take)
        yield {"caption": [str(c) for c in batch["caption"][:take]],
               "image": np.asarray(batch["image"][:take], np.float32),
               "index": np.asarray(batch["index"][:take], np.int64), "position": pos}
        done += take
        if done >= quota:
            return


def _coco_draw_batches(config, dcfg, batch_size: int, pi: int, pc: int):
    from unclip_jax.data import preprocess, sources
    from unclip_jax.eval.coco import caption_texts, draw_captions
    if dcfg.name != "tfds":
        raise EvalError("protocol.order='coco_draw' reads a tfds dataset (data.name='tfds'); for "
                        "a local copy use order='first' on a folder with one caption per image")
    src = sources.open_source(dcfg, str(config.protocol.split), 0, 1)
    key = str(dcfg.caption_key)
    caps = [caption_texts(src.read(i)["_record"], key) for i in range(len(src))]
    drawn = draw_captions(caps, int(config.protocol.num_samples),
                          int(config.protocol.get("caption_seed", 0)))
    mine = list(range(pi, len(drawn), pc))
    for s in range(0, len(mine), batch_size):
        rows = mine[s:s + batch_size]
        imgs = []
        for r in rows:
            rec = src.read(drawn[r][0])
            img = preprocess.decode(rec["image"])
            imgs.append(preprocess.resize_center_crop(img, int(dcfg.resolution)))
        yield {"caption": [drawn[r][1] for r in rows],
               "image": preprocess.normalize(np.stack(imgs)).astype(np.float32),
               "index": np.asarray([drawn[r][0] for r in rows], np.int64),
               "position": np.asarray(rows, np.int64)}


def eval_set_key(config, dcfg) -> str:
    """What identifies the real images (for reusing cached reference statistics)."""
    p = config.protocol
    desc = json.dumps({"data": dcfg.to_dict(), "split": str(p.split),
                       "num_samples": int(p.num_samples), "order": p.get("order", "first"),
                       "caption_seed": int(p.get("caption_seed", 0))}, sort_keys=True,
                      default=str)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- helpers
def _pad_rows(xs: list, size: int) -> list:
    """Repeat the last row up to `size`, so every call compiles for one batch shape."""
    return list(xs) + [xs[-1]] * (size - len(xs))


def _pad_array(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) >= size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)], 0)


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows (process-major) on all processes; slices may differ in
    length, so rows are padded to the longest and trimmed after the gather."""
    import jax
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    x = np.asarray(x)
    lengths = np.asarray(multihost_utils.process_allgather(np.int64(len(x)))).reshape(-1)
    m = int(lengths.max())
    padded = np.zeros((m,) + x.shape[1:], x.dtype)
    padded[:len(x)] = x
    allx = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
    return np.concatenate([allx[i, :int(k)] for i, k in enumerate(lengths)], 0)


def allgather_strings(strs: list[str]) -> list[str]:
    import jax
    if jax.process_count() == 1:
        return list(strs)
    enc = [s.encode("utf-8") for s in strs]
    width = int(allgather_rows(np.asarray([max([len(e) for e in enc] or [0])], np.int64)).max())
    arr = np.zeros((len(enc), max(width, 1)), np.uint8)
    for i, e in enumerate(enc):
        arr[i, :len(e)] = np.frombuffer(e, np.uint8)
    return [bytes(r).rstrip(b"\0").decode("utf-8") for r in allgather_rows(arr)]


def _safe(fn, name: str, warnings_: list):
    """A metric's value, or NaN with a note when it cannot be computed (e.g. too few samples
    for the feature dimension): one bad metric should not lose the others."""
    try:
        return fn()
    except (ValueError, np.linalg.LinAlgError) as e:
        warnings_.append(f"{name}: {e}")
        return float("nan")


def _merge_shapes(parts: list[dict]) -> dict:
    """Sum eval.shapes_accuracy's counts over batches (and processes); ratios from the sums."""
    from unclip_jax.eval.shapes_accuracy import from_counts, shapes_accuracy
    counts = {}   # "<name>_count" and "shape_confusion/<asked>/<read>" -> summed count
    # Seeded with the all-zero result so that every process gathers the same keys in the same
    # order, also one that evaluated no batch.
    for p in [shapes_accuracy([], []), *parts]:
        for k, v in p.items():
            if k.endswith("_count"):
                counts[k] = counts.get(k, 0) + int(v)
        for asked, row in p.get("shape_confusion", {}).items():
            for read, n in row.items():
                key = f"shape_confusion/{asked}/{read}"
                counts[key] = counts.get(key, 0) + int(n)
    import jax
    if jax.process_count() > 1:
        keys = sorted(counts)
        summed = allgather_rows(np.asarray([[counts[k] for k in keys]], np.int64)).sum(0)
        counts = {k: int(v) for k, v in zip(keys, summed)}
    confusion = {}
    for k in [k for k in counts if k.startswith("shape_confusion/")]:
        _, asked, read = k.split("/")
        confusion.setdefault(asked, {})[read] = counts.pop(k)
    return from_counts({k[:-len("_count")]: v for k, v in counts.items()}, confusion)


# ------------------------------------------------------------------------------------- plot
# ----------------------------------------------------------------------------------- evaluate
def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(key, v))
        elif isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def default_out(config, workdir: str) -> str:
    return os.path.join(workdir, "eval", str(config.get("name", "eval")))


def evaluate(config, workdir: str, out: str | None = None, log=print) -> dict:
    """Run the evaluation (see module docstring); returns what eval.json holds (process 0;
    other processes return their partial record without metrics)."""
    import jax

    from unclip_jax.eval import metrics as M
    from unclip_jax.eval.prior_metrics import prior_cosines
    from unclip_jax.eval.shapes_accuracy import shapes_accuracy

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    warnings_: list[str] = []
    _check_config(config)
    settings = sample_settings(config)
    mcfg = config.metrics
    pi, pc = jax.process_index(), jax.process_count()
    if int(config.protocol.num_samples) < pc:
        # Every process must hold rows: the gathers exchange same-rank arrays.
        raise EvalError(f"config.protocol.num_samples={config.protocol.num_samples} is smaller "
                        f"than the {pc} processes")
    workdir = os.path.abspath(workdir)
    out = os.path.abspath(out or default_out(config, workdir))

    # Inputs first, outputs only once they all check out (nothing is written on bad input).
    inception = None
    if _wants_inception(config):
        from unclip_jax.eval.inception import InceptionFeatures
        from unclip_jax.eval.inception_weights import load_inception_params
        t = time.perf_counter()
        # FileNotFoundError naming the path (and that nothing is downloaded) when absent.
        inception = InceptionFeatures(load_inception_params(str(config.inception_weights)),
                                      mesh=_mesh())
        timings["load_inception"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe = load_pipeline(config, workdir)
    timings["load_pipeline"] = time.perf_counter() - t
    if settings.prior == "ar" and pipe.ar_prior is None:
        raise EvalError("config.sampling.prior='ar' but the run has no AR prior")
    if settings.prior == "diffusion" and pipe.prior is None:
        raise EvalError("config.sampling.prior='diffusion' but the run has no diffusion prior")
    resolution = int(config.protocol.get("resolution", 0) or 0) or output_resolution(pipe)
    dcfg = data_config(config, pipe, resolution)
    is_shapes = dcfg.name == "shapes"
    want_shapes = mcfg.get("shapes_accuracy", "auto")
    if isinstance(want_shapes, str):
        want_shapes = is_shapes if want_shapes.lower() == "auto" else want_shapes.lower() == "true"
    if want_shapes and not is_shapes:
        raise EvalError("metrics.shapes_accuracy needs the built-in shapes data (data.name="
                        f"'shapes'), not {dcfg.name!r}")
    want_prior = bool(mcfg.get("prior", True))
    want_ar = want_prior and bool(mcfg.get("prior_ar", True)) and pipe.ar_prior is not None
    want_diff = want_prior and pipe.prior is not None
    batch_size = int(config.sampling.batch_size)
    sweep = [float(g) for g in (config.get("guidance_sweep", ()) or ())]
    scales = [float(settings.decoder_guidance)] + [g for g in sweep
                                                  if g != float(settings.decoder_guidance)]

    batches = eval_batches(config, dcfg, batch_size, pi, pc)
    first = next(batches, None)
    n_local = 0 if first is None else len(first["caption"])
    total_first = int(allgather_rows(np.asarray([n_local], np.int64)).sum())
    if total_first == 0:
        raise EvalError(f"the evaluation set is empty: split {config.protocol.split!r} of "
                        f"{dcfg.name} data gave no examples")

    # Per-example arrays of this process's slice.
    acc = {k: [] for k in ("position", "index", "text_embedding", "true_image_embedding",
                           "real_clip", "prior_diffusion", "prior_ar", "real_inception",
                           "images")}
    gen_clip = {g: [] for g in scales}
    gen_inc = {g: [] for g in scales}
    captions: list[str] = []
    shapes_parts: list[dict] = []
    ref_file = str(config.get("reference_stats", "") or "") or os.path.join(
        out, "reference_stats.npz")
    key = eval_set_key(config, dcfg)
    ref = _load_reference(ref_file, key) if inception is not None else None
    want_fid, want_kid = _inception_metric(config, "fid"), _inception_metric(config, "kid")
    # Real Inception features: for the statistics when not cached, and for KID / precision-
    # recall (which need the features, not just mu and sigma).
    need_real_inc = inception is not None and (
        ref is None or ("features" not in ref and (want_kid or
                                                   bool(mcfg.get("precision_recall", True)))))
    keep_images = bool(config.get("save_images", False))
    grid_n = int(config.get("grid_images", 64))
    grid: list[np.ndarray] = []

    def step(batch):
        caps, b = batch["caption"], len(batch["caption"])
        size = max(b, min(batch_size, int(config.protocol.num_samples)))
        pcaps = _pad_rows(caps, size)
        seed = int(config.seed) + int(batch["position"][0])
        real = _pad_array(batch["image"], size)
        t = time.perf_counter()
        txt = pipe.encode_text(pcaps)["text_embedding"][:b]
        acc["text_embedding"].append(txt)
        real_clip = pipe.encode_images(real)[:b]
        acc["true_image_embedding"].append(real_clip)
        timings["clip_real"] = timings.get("clip_real", 0.0) + time.perf_counter() - t
        if need_real_inc:
            t = time.perf_counter()
            acc["real_inception"].append(inception(batch["image"]))
            timings["inception"] = timings.get("inception", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        if want_diff:
            s = dataclasses.replace(settings, prior="diffusion")
            acc["prior_diffusion"].append(pipe.sample_prior(pcaps, seed=seed + 1_000_003,
                                                            settings=s)[:b])
        if want_ar:
            s = dataclasses.replace(settings, prior="ar")
            acc["prior_ar"].append(pipe.sample_prior(pcaps, seed=seed + 2_000_003,
                                                     settings=s)[:b])
        timings["prior_sampling"] = timings.get("prior_sampling", 0.0) + time.perf_counter() - t
        for g in scales:
            s = dataclasses.replace(settings, decoder_guidance=g)
            t = time.perf_counter()
            # Same seed at every scale: the sweep compares guidance, not noise draws.
            imgs = to_uint8(pipe.text_to_image(pcaps, seed=seed, settings=s)["images"][:b])
            timings["sampling"] = timings.get("sampling", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            gen_clip[g].append(pipe.encode_images(_pad_array(from_uint8(imgs), size))[:b])
            timings["clip_generated"] = (timings.get("clip_generated", 0.0)
                                         + time.perf_counter() - t)
            if inception is not None:
                t = time.perf_counter()
                gen_inc[g].append(inception(imgs))
                timings["inception"] = timings.get("inception", 0.0) + time.perf_counter() - t
            if g == scales[0]:
                if want_shapes:
                    shapes_parts.append(shapes_accuracy(imgs, caps))
                if keep_images:
                    acc["images"].append(imgs)
                if len(grid) < grid_n:
                    grid.extend(list(imgs[:grid_n - len(grid)]))
        captions.extend(caps)
        acc["position"].append(np.asarray(batch["position"], np.int64))
        acc["index"].append(np.asarray(batch["index"], np.int64))

    done = 0
    if first is not None:
        import itertools
        for batch in itertools.chain([first], batches):
            step(batch)
            done += len(batch["caption"])
            log(f"[eval] {done} captions sampled on process {pi}")

    cat = {k: (allgather_rows(np.concatenate(v, 0)) if v else None) for k, v in acc.items()
           if k not in ("images",)}
    gen_clip = {g: allgather_rows(np.concatenate(v, 0)) for g, v in gen_clip.items()}
    gen_inc = {g: allgather_rows(np.concatenate(v, 0)) for g, v in gen_inc.items() if v}
    captions = allgather_strings(captions)
    shapes_res = _merge_shapes(shapes_parts) if want_shapes else None
    images = allgather_rows(np.concatenate(acc["images"], 0)) if acc["images"] else None
    grid_all = allgather_rows(np.stack(grid)) if grid else None
    n = len(captions)
    if pi != 0:
        return {"num_samples": n}

    # ----- metrics (process 0)
    t = time.perf_counter()
    g0 = scales[0]
    real_clip = cat["true_image_embedding"]
    res: dict = {}
    if mcfg.get("clip_fd", True):
        res["clip_fd"] = _safe(lambda: M.fid_from_features(real_clip, gen_clip[g0]),
                               "clip_fd", warnings_)
    if mcfg.get("clip_score", True):
        res["clip_score"] = M.clip_score(gen_clip[g0], cat["text_embedding"])
        res["clip_score_real"] = M.clip_score(real_clip, cat["text_embedding"])
        # The unclamped mean cosine too: CLIP score clamps at 0, which hides how far below
        # zero a weak model is.
        res["clip_cosine"] = _mean_cos(gen_clip[g0], cat["text_embedding"])
        res["clip_cosine_real"] = _mean_cos(real_clip, cat["text_embedding"])
    real_inc_stats = None
    if inception is not None:
        real_feats = cat["real_inception"] if need_real_inc else ref.get("features")
        if ref is not None:
            real_inc_stats = (ref["mu"], ref["sigma"])
        else:
            real_inc_stats = M.feature_statistics(real_feats)
            _save_reference(ref_file, key, real_feats, config)
        if want_fid:
            res["fid"] = _safe(lambda: M.frechet_distance(*real_inc_stats,
                                                          *M.feature_statistics(gen_inc[g0])),
                               "fid", warnings_)
        if want_kid and real_feats is not None:
            sub = min(int(mcfg.get("kid_subset_size", 1000)), len(real_feats), n)
            res["kid_subset_size"] = sub
            k = _safe(lambda: M.kid(real_feats, gen_inc[g0], subset_size=sub,
                                    num_subsets=int(mcfg.get("kid_subsets", 100))),
                      "kid", warnings_)
            res.update(k if isinstance(k, dict) else {"kid_mean": k, "kid_std": k})
    if mcfg.get("precision_recall", True):
        use_inc = inception is not None and (
            (cat["real_inception"] is not None) or (ref is not None and "features" in ref))
        real_f = ((cat["real_inception"] if cat["real_inception"] is not None
                   else ref["features"]) if use_inc else real_clip)
        gen_f = gen_inc[g0] if use_inc else gen_clip[g0]
        kk = int(mcfg.get("pr_k", 3))
        pr = _safe(lambda: M.precision_recall(real_f, gen_f, k=kk), "precision_recall",
                   warnings_)
        res.update(pr if isinstance(pr, dict) else {"precision": pr, "recall": pr})
        res["pr_features"] = "inception" if use_inc else "clip"
        res["pr_k"] = kk
    prior = {}
    if want_diff:
        prior["diffusion"] = prior_cosines(cat["prior_diffusion"], real_clip,
                                           cat["text_embedding"])
    if want_ar:
        prior["ar"] = prior_cosines(cat["prior_ar"], real_clip, cat["text_embedding"])
    sweep_res, sweep_metric = [], ("fid" if inception is not None else "clip_fd")
    if sweep:
        for g in sweep:
            e = {"guidance": g}
            if inception is not None:
                e["fid"] = _safe(lambda g=g: M.frechet_distance(
                    *real_inc_stats, *M.feature_statistics(gen_inc[g])), f"fid@{g}", warnings_)
            e["clip_fd"] = _safe(lambda g=g: M.fid_from_features(real_clip, gen_clip[g]),
                                 f"clip_fd@{g}", warnings_)
            e["clip_score"] = M.clip_score(gen_clip[g], cat["text_embedding"])
            sweep_res.append(e)
    timings["metrics"] = time.perf_counter() - t

    # ----- outputs
    os.makedirs(out, exist_ok=True)
    steps = {name: int(t.step) for name, t in (
        ("clip", pipe.clip), ("diffusion_prior", pipe.prior), ("ar_prior", pipe.ar_prior),
        ("decoder", pipe.decoder)) if t is not None}
    for i, u in enumerate(pipe.upsamplers):
        steps["upsampler" if i == 0 else f"upsampler_{i + 1}"] = int(u.step)
    files = {"json": "eval.json", "samples": "samples.npz"}
    arrays = {"caption": np.asarray(captions, dtype=str), "index": cat["index"],
              "position": cat["position"], "text_embedding": cat["text_embedding"],
              "true_image_embedding": real_clip, "gen_clip": gen_clip[g0]}
    for k in ("prior_diffusion", "prior_ar", "real_inception"):
        if cat[k] is not None:
            arrays[k] = cat[k]
    if inception is not None:
        arrays["gen_inception"] = gen_inc[g0]
    for g in sweep:  # what each sweep entry was computed from
        arrays[f"gen_clip_g{g:g}"] = gen_clip[g]
        if inception is not None:
            arrays[f"gen_inception_g{g:g}"] = gen_inc[g]
    if images is not None:
        arrays["images"] = images
    np.savez(os.path.join(out, "samples.npz"), **arrays)
    if grid_all is not None:
        from unclip_jax.images import save_grid
        cols = math.ceil(math.sqrt(len(grid_all)))
        save_grid(from_uint8(grid_all), os.path.join(out, "samples.png"), cols,
                  labels=captions[:len(grid_all)])
        files["grid"] = "samples.png"
    if sweep:
        ys = [(e["guidance"], e[sweep_metric]) for e in sweep_res]
        label = "FID (Inception)" if inception is not None else "CLIP-space FD"
        note = ("" if inception is not None else
                "no Inception weights configured: Frechet distance of CLIP image embeddings")
        plot_sweep(sorted(ys), os.path.join(out, PLOT_FILE), label,
                   f"{label} vs decoder guidance ({n} captions, step {pipe.decoder.step})", note)
        files["plot"] = PLOT_FILE
    result = {
        "name": str(config.get("name", "eval")), "workdir": workdir, "out": out,
        "step": int(pipe.decoder.step), "checkpoint_steps": steps, "num_samples": n,
        "processes": pc, "devices": jax.device_count(),
        "data": {"name": dcfg.name, "split": str(config.protocol.split), "resolution": resolution,
                 "order": config.protocol.get("order", "first")},
        "settings": dataclasses.asdict(settings), "seed": int(config.seed),
        "inception": (str(config.inception_weights) if inception is not None else None),
        "metrics": res, "prior": prior, "shapes_accuracy": shapes_res,
        "guidance_sweep": sweep_res, "sweep_metric": sweep_metric if sweep else None,
        "files": files, "warnings": warnings_,
    }
    timings["total"] = time.perf_counter() - t_start
    result["timings_s"] = timings
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2, default=_json_default)
    _write_tensorboard(os.path.join(out, "tensorboard"), result)
    log(f"[eval] wrote {os.path.join(out, 'eval.json')}: " + ", ".join(
        f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, float)))
    return result


def _mean_cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) *
                                              np.linalg.norm(b, axis=1), 1e-12)).mean())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_tensorboard(path: str, result: dict):
    from tensorboardX import SummaryWriter
    w = SummaryWriter(path)
    step = int(result["step"])
    scalars = _flat("eval", {"metrics": result["metrics"], "prior": result["prior"],
                             "shapes": result["shapes_accuracy"] or {}})
    for e in result["guidance_sweep"]:
        for k, v in e.items():
            if k != "guidance":
                scalars[f"eval/sweep/{k}_g{e['guidance']:g}"] = float(v)
    for k, v in scalars.items():
        if math.isfinite(v):
            w.add_scalar(k, v, step)
    w.close()


def _load_reference(path: str, key: str) -> dict | None:
    """Cached real-image Inception statistics: our cache (checked against the evaluation set's
    key) or a precomputed (mu, sigma) npz, e.g. pytorch-fid's --save-stats."""
    if not os.path.isfile(path):
        return None
    with np.load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise EvalError(f"reference statistics {path} have no mu/sigma (have {f.files})")
        if "key" in f.files and str(f["key"]) != key:
            return None  # our cache, for another evaluation set: recompute
        out = {"mu": np.asarray(f["mu"], np.float64), "sigma": np.asarray(f["sigma"], np.float64)}
        if "features" in f.files:
            out["features"] = np.asarray(f["features"], np.float32)
        return out


def _save_reference(path: str, key: str, feats, config):
    from unclip_jax.eval.metrics import feature_statistics
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mu, sigma = feature_statistics(feats)
    np.savez(path, mu=mu, sigma=sigma, n=np.int64(len(feats)), key=key,
             features=np.asarray(feats, np.float32))


# ---------------------------------------------------------------------------------------- CLI
def _flags(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    # sys_argv: config_flags reads the --config.x overrides from it (default: sys.argv, which
    # is not our argv when run() is called in-process).
    config_flags.DEFINE_config_file("config", None, "Evaluation config (experiments/eval/*.py).",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "The main job's workdir (trained stages).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory (default <workdir>/eval/<config.name>).",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=fv)
    return fv


def run(argv: list[str], log=print) -> dict:
    """Parse `--workdir --config [--out] [--config.x=...]` and evaluate."""
    from absl import flags
    argv = ["unclip_jax.evaluate"] + list(argv)
    fv = _flags(argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise EvalError(f"bad arguments: {e}") from e
    if fv.config is None or not fv.workdir:
        raise EvalError("--config and --workdir are required")
    from unclip_jax import distributed
    distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    return evaluate(fv.config, fv.workdir, fv.out, log=log)


def main():
    try:
        res = run(sys.argv[1:])
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        msg = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    if "out" in res:
        print(f"wrote {res['out']}/eval.json ({res['num_samples']} captions, step {res['step']})")


if __name__ == "__main__":
    main()
