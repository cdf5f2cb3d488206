"""The shapes recipe of the whole-stack runner (recipes/runner.py): every stage trained on the
built-in shapes dataset, CLIP included, then samples and a pixel report.

    python -m unclip_jax.main --config=experiments/shapes.py --workdir=runs/shapes

Order: clip -> embed (CLIP embedding cache) -> diffusion_prior -> ar_prior -> decoder ->
upsampler -> samples (a PNG grid for fixed prompts) -> report (JSON + markdown). What is here
is the report (STEPS["report"]); the rest is the runner's.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from unclip_jax import paths
from unclip_jax.console import say
from unclip_jax.eval.sampling import check_prompts
from unclip_jax.images import from_uint8, save_grid
from unclip_jax.inference import Pipeline, SampleSettings
from unclip_jax.recipes.runner import dataclass_dict, run_pipeline, stage_configs  # noqa: F401
from unclip_jax.recipes.runner import settings_from_config as _settings
from unclip_jax.stages import UNCLIP_STAGES


def evaluate_true_embeddings(pipe: Pipeline, prompts, per_prompt: int, seed: int,
                             settings: SampleSettings, *, render_size: int = 64,
                             batch: int = 64) -> dict:
    """The report's no-prior rows: for each single-object prompt, render per_prompt scenes of that
    colour and shape (background, size and position drawn as in the data), decode their TRUE CLIP
    image embeddings with the prompt as caption, upsample, and check the pixels. This splits the
    errors between the priors and the decoder + upsamplers. Two more rows split the rest: the
    renders at the decoder's size put through the upsamplers alone (their share), and the renders
    themselves at the output size (the check's ceiling). Scenes are rendered at `render_size`
    (the dataset's) and resized like the training data.
    Returns {"decoded", "upsampled_render" (None without upsamplers), "rendered"}: accuracies,
    and "images": the decoded and upsampled images ([0] when no prompt has one object)."""
    from unclip_jax.data import preprocess, shapes, shapes_eval
    from unclip_jax.eval.shapes_accuracy import shapes_accuracy
    all_prompts, renders = [], []
    for i, p in enumerate(prompts):
        try:
            colour, shape = shapes_eval.parse_single(p)
        except ValueError:   # not a one-object shapes caption: nothing to render for it
            continue
        rng = np.random.default_rng([seed, i])
        for _ in range(per_prompt):
            renders.append(shapes.render(shapes.single_object_scene(rng, colour, shape),
                                         render_size))
            all_prompts.append(p)
    if not all_prompts:
        return {"decoded": None, "upsampled_render": None, "rendered": None,
                "images": np.zeros((0,), np.float32)}
    clip_size = int(pipe.clip.config.model.image_size)
    dec_size = int(pipe.decoder.config.model.image_size)
    last = pipe.upsamplers[-1] if pipe.upsamplers else pipe.decoder
    out_size = int(last.config.model.image_size)

    def at(size):
        return np.stack([preprocess.normalize(preprocess.resize_center_crop(r, size))
                         for r in renders])

    clip_in, reference = at(clip_size), at(out_size)
    low = at(dec_size) if pipe.upsamplers else None   # the upsampler-only row's input
    images, upsampled = [], []
    for i in range(0, len(all_prompts), batch):
        z = pipe.encode_images(clip_in[i:i + batch])
        dec = pipe.decode(z, prompts=all_prompts[i:i + batch], seed=seed + i, settings=settings)
        images.append(pipe.upsample(dec, seed=seed + i, settings=settings))
        if pipe.upsamplers:
            upsampled.append(pipe.upsample(low[i:i + batch], seed=seed + i, settings=settings))
    images = np.concatenate(images)
    return {"decoded": shapes_accuracy(images, all_prompts),
            "upsampled_render": (shapes_accuracy(np.concatenate(upsampled), all_prompts)
                                 if upsampled else None),
            "rendered": shapes_accuracy(reference, all_prompts), "images": images}


def _report(config, workdir: str, pipe: Pipeline, timings: dict):
    path = os.path.join(workdir, "report.json")
    if paths.path(path).exists():
        say(f"[report] {path} exists: skipped")
        return
    r = config.report
    settings = _settings(config)
    prompts = [p for p in r.prompts for _ in range(int(r.per_prompt))]
    t = time.perf_counter()
    acc, images = check_prompts(pipe, prompts, seed=int(r.seed), settings=settings)
    timings["report_sampling"] = time.perf_counter() - t
    save_grid(from_uint8(images), os.path.join(workdir, "samples", "report_grid.png"),
              int(r.per_prompt))
    checks = _check_prompt_groups(pipe, r, settings, os.path.join(workdir, "samples"), timings)
    acc_ar = None
    if pipe.ar_prior is not None and bool(r.ar_prior):
        import dataclasses
        t = time.perf_counter()
        acc_ar, images = check_prompts(pipe, prompts, seed=int(r.seed),
                                       settings=dataclasses.replace(settings, prior="ar"))
        timings["report_sampling_ar"] = time.perf_counter() - t
        save_grid(from_uint8(images), os.path.join(workdir, "samples", "report_grid_ar.png"),
                  int(r.per_prompt))
    true = {}
    if bool(r.true_embedding):
        t = time.perf_counter()
        true = evaluate_true_embeddings(
            pipe, list(r.prompts), int(r.per_prompt), int(r.seed), settings,
            render_size=int(config.data.shapes.image_size))
        timings["report_true_embedding"] = time.perf_counter() - t
        if len(true["images"]):
            save_grid(true["images"], os.path.join(workdir, "samples", "report_grid_true_z.png"),
                      int(r.per_prompt))
    acc_true = true.get("decoded")
    priors = _prior_cosines(pipe, os.path.join(workdir, "embed"), settings,
                            int(r.prior_examples), int(r.seed))
    stages = {}
    for name in UNCLIP_STAGES:
        mfile = os.path.join(workdir, name, "metrics.jsonl")
        if paths.path(mfile).exists():
            rows = [json.loads(line) for line in paths.path(mfile).read_text().splitlines()
                    if line.strip()]
            if rows:
                stages[name] = {"step": rows[-1]["step"], "loss": rows[-1].get("loss"),
                                "first_loss": rows[0].get("loss")}
    report = {"accuracy": acc, **checks, "accuracy_ar_prior": acc_ar,
              "accuracy_true_embedding": acc_true,
              "accuracy_upsampled_render": true.get("upsampled_render"),
              "accuracy_rendered": true.get("rendered"),
              "prior_cosines": priors,
              "stages": stages, "timings_s": timings,
              "settings": dataclass_dict(settings), "eval_prompts": list(r.prompts),
              "per_prompt": int(r.per_prompt), "devices": jax.device_count(),
              "device_kind": jax.devices()[0].device_kind}
    if jax.process_index() == 0:
        paths.write_text(path, json.dumps(report, indent=2))
        paths.write_text(os.path.join(workdir, "report.md"), _markdown(report))
    b, p = report.get("accuracy_binding"), report.get("accuracy_position")
    say(f"[report] single-object prompts: colour {acc['colour_acc']:.1%}, shape "
         f"{acc['shape_acc']:.1%}, both {acc['both_acc']:.1%} over {acc['single_count']} "
         f"samples (diffusion prior; strict shape check)" + (
             f"; two-object binding {b['binding_acc']:.1%}" if b else "") + (
             f"; position words {p['position_acc']:.1%}" if p else "") + (
             f"; AR prior: colour {acc_ar['colour_acc']:.1%}, shape {acc_ar['shape_acc']:.1%},"
             f" both {acc_ar['both_acc']:.1%}" if acc_ar else "") + (
             f"; decoder from the true z_i: colour {acc_true['colour_acc']:.1%}, shape "
             f"{acc_true['shape_acc']:.1%}" if acc_true else "") + f"; {path}")


def _check_prompt_groups(pipe: Pipeline, r, settings: SampleSettings, samples_dir: str,
                         timings: dict) -> dict:
    """The two-object prompts (`report.binding_prompts`: is each named colour-shape pair drawn
    as one object) and the prompts with position words or relations (`report.position_prompts`:
    are they honoured), sampled with the diffusion prior in one pass (same batch shape as the
    single-object prompts: no new compile). Returns {"accuracy_binding", "accuracy_position",
    "prompt_checks": per prompt}; empty without such prompts. Grid:
    samples/report_grid_binding.png, one row per prompt."""
    from unclip_jax.data import shapes_eval
    from unclip_jax.eval.shapes_accuracy import shapes_accuracy
    groups = {"accuracy_binding": tuple(r.get("binding_prompts", ())),
              "accuracy_position": tuple(r.get("position_prompts", ()))}
    per = int(r.per_prompt)
    unique = [p for ps in groups.values() for p in ps]
    for p in unique:
        shapes_eval.parse_caption(p)    # a prompt outside the caption grammar: a clear error
    if not unique:
        return {}
    t = time.perf_counter()
    _, images = check_prompts(pipe, [p for p in unique for _ in range(per)], seed=int(r.seed),
                              settings=settings)
    timings["report_sampling_binding_position"] = time.perf_counter() - t
    save_grid(from_uint8(images), os.path.join(samples_dir, "report_grid_binding.png"), per)
    out, start = {}, 0
    for key, ps in groups.items():
        n = len(ps) * per
        out[key] = shapes_accuracy(images[start:start + n], [p for p in ps for _ in range(per)])
        start += n
    out["prompt_checks"] = {}
    for i, p in enumerate(unique):
        a = shapes_accuracy(images[i * per:(i + 1) * per], [p] * per)
        out["prompt_checks"][p] = {k: (None if np.isnan(a[f"{k}_acc"]) else a[f"{k}_acc"])
                                   for k in ("both", "binding", "position", "relation")}
    return out


def _prior_cosines(pipe: Pipeline, cache_dir: str, settings: SampleSettings, n: int,
                   seed: int) -> dict:
    """cos(sampled z_i, true z_i) against the cos(z_t, true z_i) baseline for each trained prior
    (the paper's reason for a prior: beat using z_t directly): the evaluator's comparison
    (eval.sampling.prior_comparison) on the first n captions of the cache's test split, with
    their cached CLIP embeddings as true z_i and z_t."""
    from unclip_jax.data import default_data_config
    from unclip_jax.data.sources import CacheSource
    from unclip_jax.eval.sampling import prior_comparison

    priors = tuple(name for name, stage in (("diffusion", pipe.prior), ("ar", pipe.ar_prior))
                   if stage is not None)
    if not (paths.path(cache_dir) / "test").is_dir() or not priors:
        return {}
    d = default_data_config("embed_cache")
    d.cache_dir = cache_dir
    src = CacheSource(d, "test", 0, 1)
    rows = [src.read_row(i) for i in range(min(n, len(src)))]
    return prior_comparison(pipe, [row["caption"] for row in rows],
                            np.stack([row["image_embedding"] for row in rows]),
                            np.stack([row["text_embedding"] for row in rows]), seed=seed,
                            settings=settings, priors=priors)


def _pct(x) -> str:
    return "" if x is None or np.isnan(x) else f"{x:.1%}"


def _markdown(r: dict) -> str:
    a = r["accuracy"]
    lines = ["# unclip-jax run report", "",
             f"Pixel check of {a['single_count']} samples for {len(r['eval_prompts'])} "
             "single-object prompts. Colour: the object's pixels. Shape (strict): the object against the ideal "
             "circle, square and upright triangle fitted to its box; a blob is no shape. Fill "
             "ratio: the old check (area / box area), which reads any blob as a circle.", "",
             "| prior | colour | shape | both | shape (fill ratio) | both (fill ratio) |",
             "|---|---|---|---|---|---|"]
    for key, name in (("accuracy", "diffusion"), ("accuracy_ar_prior", "AR"),
                      ("accuracy_true_embedding", "none: true z_i of rendered scenes, decoded"),
                      ("accuracy_upsampled_render",
                       "none: rendered scenes at the decoder's size, upsampled"),
                      ("accuracy_rendered", "none: the rendered scenes themselves")):
        if r.get(key):
            b = r[key]
            lines.append(f"| {name} | {_pct(b['colour_acc'])} | {_pct(b['shape_acc'])} | "
                         f"{_pct(b['both_acc'])} | {_pct(b.get('shape_fill_acc'))} | "
                         f"{_pct(b.get('both_fill_acc'))} |")
    confusions = [(name, r[key]["shape_confusion"]) for key, name in (
        ("accuracy", "diffusion prior"), ("accuracy_true_embedding", "true z_i, decoded"))
        if r.get(key) and r[key].get("shape_confusion")]
    if confusions:
        from unclip_jax.data.shapes import SHAPES
        read = SHAPES + ("blob", "none")
        lines += ["", "Shape asked for (rows) and shape read from the pixels by the strict check "
                  "(columns; blob: an object that is no shape; none: no object found), "
                  "single-object samples:", "",
                  "| samples | asked | " + " | ".join(read) + " |",
                  "|---|---|" + "---|" * len(read)]
        for name, conf in confusions:
            for asked in SHAPES:
                lines.append(f"| {name} | {asked} | "
                             + " | ".join(str(conf[asked].get(x, 0)) for x in read) + " |")
    if r.get("prompt_checks"):
        per = r["per_prompt"]
        lines += ["", f"Two-object prompts and position words, diffusion prior, {per} samples "
                  "per prompt. Binding: each named colour-shape pair is seen as one object (a "
                  "swapped pairing fails). Position: the named object's box centre is nearest "
                  "that position. Relation: both objects bound and the relation holds.", "",
                  "| prompt | both (one object) | binding | position | relation |",
                  "|---|---|---|---|---|"]
        for p, c in r["prompt_checks"].items():
            lines.append(f"| {p} | {_pct(c['both'])} | {_pct(c['binding'])} | "
                         f"{_pct(c['position'])} | {_pct(c['relation'])} |")
        parts = [r.get("accuracy_binding") or {}, r.get("accuracy_position") or {}]
        lines.append(f"| all |  | {_pct(_pooled(parts, 'binding', 'two'))} | "
                     f"{_pct(_pooled(parts, 'positions_right', 'positions_named'))} | "
                     f"{_pct(_pooled(parts, 'relations_right', 'relations_named'))} |")
    if r.get("prior_cosines"):
        from unclip_jax.eval.prior_metrics import prior_table
        lines += ["", "Priors on the cache's test split (cosine to the true CLIP image embedding):",
                  "", prior_table(r["prior_cosines"])]
    lines += ["", "| stage | steps | first loss | last loss | train time (s) |", "|---|---|---|---|---|"]
    for name, s in r["stages"].items():
        t = r["timings_s"].get(name)
        lines.append(f"| {name} | {s['step']} | {s['first_loss']:.4g} | {s['loss']:.4g} | "
                     f"{'' if t is None else f'{t:.0f}'} |")
    lines += ["", f"Sampling settings: `{json.dumps(r['settings'])}`", "",
              "Samples: `samples/grid.png` (fixed prompts), `samples/report_grid.png` (evaluation; "
              "`report_grid_ar.png` with the AR prior, `report_grid_true_z.png` decoded from the "
              "true z_i of rendered scenes: the decoder's share of the errors; "
              "`report_grid_binding.png`: the two-object and position prompts, one row each).",
              ""]
    return "\n".join(lines)


def _pooled(parts: list[dict], right: str, named: str) -> float:
    """Sum of the `<right>_count` over the sum of the `<named>_count` of shapes_accuracy results."""
    n = sum(p.get(f"{named}_count", 0) for p in parts)
    return sum(p.get(f"{right}_count", 0) for p in parts) / n if n else float("nan")


# The runner's hooks (recipes/runner.py): the shapes recipe adds the pixel report.
STEPS = {"report": lambda run: _report(run.config, run.workdir, run.pipe(), run.timings)}
