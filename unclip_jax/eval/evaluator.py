"""`evaluate(config, workdir, out)`: sample for the captions of an evaluation set and score the
samples (what `python -m unclip_jax.evaluate` runs; its module docstring lists the outputs).

Steps: check every input (nothing is written on bad input) -> sample batch by batch
(eval.collect) -> gather over processes -> score on process 0 (eval.scores) -> write
(eval.outputs)."""
from __future__ import annotations

import dataclasses
import os
import time

from unclip_jax import paths
from unclip_jax.eval.dataset import data_config, eval_batches, eval_set_key
from unclip_jax.eval.load import checkpoint_steps, config_mesh, load_pipeline, output_resolution
from unclip_jax.eval.plan import EvalError, check_config, make_plan, sample_settings, \
    wants_inception


def default_out(config, workdir: str) -> str:
    return os.path.join(workdir, "eval", str(config.name))


@dataclasses.dataclass
class _Inputs:
    pipe: object
    inception: object | None       # eval.inception.InceptionFeatures, when FID / KID run
    dcfg: object                   # the evaluation data's config
    plan: object                   # eval.plan.Plan
    batches: object                # this process's batches (eval.dataset.eval_batches)
    reference_file: str
    reference_key: str
    reference: dict | None         # cached real Inception statistics
    real_inception: bool           # compute the real images' Inception features


def _batches_checked(config, dcfg, batch_size: int):
    """This process's batches; an error (on every process) when no process has any."""
    import itertools

    import jax
    import numpy as np

    from unclip_jax.eval.gather import allgather_rows
    batches = eval_batches(config, dcfg, batch_size, jax.process_index(), jax.process_count())
    first = next(batches, None)
    n_local = 0 if first is None else len(first["caption"])
    if int(allgather_rows(np.asarray([n_local], np.int64)).sum()) == 0:
        raise EvalError(f"the evaluation set is empty: split {config.protocol.split!r} of "
                        f"{dcfg.name} data gave no examples")
    return iter(()) if first is None else itertools.chain([first], batches)


def _inputs(config, workdir: str, out: str, timings: dict) -> _Inputs:
    """Everything read before sampling; raises on bad input before anything is written."""
    import jax
    check_config(config, jax.process_count())
    settings = sample_settings(config, workdir)
    inception = None
    if wants_inception(config):
        from unclip_jax.eval.inception import InceptionFeatures
        from unclip_jax.eval.inception_weights import load_inception_params
        t = time.perf_counter()
        # FileNotFoundError naming the path (and that nothing is downloaded) when absent.
        inception = InceptionFeatures(load_inception_params(str(config.inception_weights)),
                                      mesh=config_mesh(config))
        timings["load_inception"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe = load_pipeline(config, workdir)
    timings["load_pipeline"] = time.perf_counter() - t
    resolution = int(config.protocol.resolution) or output_resolution(pipe)
    dcfg = data_config(config, pipe, resolution)
    plan = make_plan(config, settings, pipe, dcfg.name)
    batches = _batches_checked(config, dcfg, plan.batch_size)
    ref_file = str(config.reference_stats) or os.path.join(
        out, "reference_stats.npz")
    key = eval_set_key(config, dcfg)
    ref = None
    if inception is not None:
        from unclip_jax.eval.outputs import load_reference
        ref = load_reference(ref_file, key)
    # Real Inception features: for the statistics when not cached, and for KID / precision-
    # recall (which need the features, not just mu and sigma).
    need_real = inception is not None and (ref is None or (
        "features" not in ref and (plan.kid or plan.precision_recall)))
    return _Inputs(pipe, inception, dcfg, plan, batches, ref_file, key, ref, need_real)


def evaluate(config, workdir: str, out: str | None = None, log=print) -> dict:
    """Run the evaluation; returns what eval.json holds (process 0; other processes return
    {"num_samples": n} without metrics)."""
    import jax

    from unclip_jax.eval.collect import Collected, gather, sample_batch
    t_start = time.perf_counter()
    workdir = str(paths.path(workdir))
    out = str(paths.path(out or default_out(config, workdir)))
    timings: dict[str, float] = {}
    inp = _inputs(config, workdir, out, timings)
    collected = Collected(inp.plan.keep_images, inp.plan.grid_images)
    for batch in inp.batches:
        collected.add(sample_batch(inp.pipe, inp.inception, inp.plan, batch, inp.real_inception))
        log(f"[eval] {collected.count} captions sampled on process {jax.process_index()}")
    timings.update(collected.seconds)
    samples = gather(collected, inp.plan)
    if jax.process_index() != 0:
        return {"num_samples": samples.n}
    return _score_and_write(config, workdir, out, inp, samples, timings, t_start, log)


def _score_and_write(config, workdir, out, inp: _Inputs, samples, timings, t_start, log) -> dict:
    import jax

    from unclip_jax.eval import outputs as O
    from unclip_jax.eval import scores as S
    plan, pipe = inp.plan, inp.pipe
    t = time.perf_counter()
    warnings: list[str] = []
    real = (S.real_inception(samples, inp.reference) if inp.inception is not None else None)
    metrics = S.image_metrics(plan, samples, real, warnings)
    prior = S.prior_metrics(plan, samples)
    sweep = S.sweep_metrics(plan, samples, real, warnings)
    timings["metrics"] = time.perf_counter() - t

    if real is not None and inp.reference is None:
        O.save_reference(inp.reference_file, inp.reference_key, real)
    files = {"json": "eval.json", "samples": "samples.npz"}
    O.write_samples(os.path.join(out, "samples.npz"), plan, samples)
    if samples.grid is not None:
        O.write_grid(os.path.join(out, "samples.png"), samples)
        files["grid"] = "samples.png"
    sweep_metric = None
    if plan.sweep:
        sweep_metric = O.write_sweep_plot(os.path.join(out, O.PLOT_FILE), sweep,
                                          inp.inception is not None, samples.n,
                                          int(pipe.decoder.step))
        files["plot"] = O.PLOT_FILE
    result = {
        "name": str(config.name), "workdir": workdir, "out": out,
        "step": int(pipe.decoder.step), "checkpoint_steps": checkpoint_steps(pipe),
        "num_samples": samples.n, "processes": jax.process_count(),
        "devices": jax.device_count(),
        "data": {"name": inp.dcfg.name, "split": str(config.protocol.split),
                 "resolution": int(inp.dcfg.resolution),
                 "order": config.protocol.order},
        "settings": dataclasses.asdict(plan.settings), "seed": plan.seed,
        "inception": (str(config.inception_weights) if inp.inception is not None else None),
        "metrics": metrics, "prior": prior, "shapes_accuracy": samples.shapes,
        "guidance_sweep": sweep, "sweep_metric": sweep_metric,
        "files": files, "warnings": warnings,
    }
    timings["total"] = time.perf_counter() - t_start
    result["timings_s"] = timings
    O.write_json(os.path.join(out, "eval.json"), result)
    O.write_tensorboard(os.path.join(out, "tensorboard"), result)
    log(f"[eval] wrote {os.path.join(out, 'eval.json')}: " + ", ".join(
        f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return result
