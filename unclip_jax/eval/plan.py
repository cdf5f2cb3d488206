"""What an evaluation computes: the config checked and resolved into a `Plan`.

Every check here runs before anything is sampled or written, so bad input costs one line."""
from __future__ import annotations

import dataclasses
import math


class EvalError(ValueError):
    """Bad evaluation input; the CLI prints it in one line and exits with code 2."""


def sample_settings(config, workdir: str | None = None):
    """SampleSettings from config.sampling (its fields plus batch_size and preset); unknown
    fields are an error rather than silently ignored (a misspelt guidance would change every
    number). preset "auto" (the default) applies Karlo's settings when `workdir` is a converted
    Karlo workdir, "karlo" always, "none" never."""
    from unclip_jax import karlo
    from unclip_jax.inference import SampleSettings
    fields = {f.name for f in dataclasses.fields(SampleSettings)}
    given = {k: v for k, v in config.sampling.items() if k not in ("batch_size", "preset")}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise EvalError(f"config.sampling has unknown fields {unknown}; SampleSettings fields: "
                        f"{sorted(fields)} (plus batch_size, preset)")
    preset = config.sampling.get("preset", "auto")
    if preset not in ("auto", "karlo", "none"):
        raise EvalError(f"config.sampling.preset must be auto, karlo or none, got {preset!r}")
    s = SampleSettings(**given)
    if preset == "karlo" or (preset == "auto" and workdir and karlo.is_karlo_workdir(workdir)):
        s = karlo.preset_settings(s)
    return s


def _choice(config, name: str, auto: bool) -> bool:
    """metrics.<name>: True, False or "auto" (-> `auto`); also the strings "true" / "false", as
    a str field takes them from the command line."""
    v = config.metrics[name]
    if isinstance(v, str):
        v = v.strip().lower()
        if v not in ("auto", "true", "false"):
            raise EvalError(f"config.metrics.{name} must be true, false or auto, got {v!r}")
        return auto if v == "auto" else v == "true"
    return bool(v)


def inception_metric(config, name: str) -> bool:
    """metrics.fid / metrics.kid; "auto" = when config.inception_weights is set."""
    return _choice(config, name, bool(config.inception_weights))


def wants_inception(config) -> bool:
    return inception_metric(config, "fid") or inception_metric(config, "kid")


def check_config(config, process_count: int = 1):
    n = int(config.protocol.num_samples)
    if n <= 0:
        raise EvalError(f"config.protocol.num_samples is {n}: the evaluation set is empty")
    if n < process_count:
        # Every process must hold rows: the gathers exchange same-rank arrays.
        raise EvalError(f"config.protocol.num_samples={n} is smaller than the {process_count} "
                        "processes")
    if int(config.sampling.batch_size) <= 0:
        raise EvalError("config.sampling.batch_size must be positive")
    for g in config.guidance_sweep or ():
        if not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0):
            raise EvalError(f"config.guidance_sweep holds {g!r}; scales must be positive numbers")
    if wants_inception(config) and not config.inception_weights:
        raise EvalError("FID/KID requested (config.metrics.fid / kid) but config.inception_weights "
                        "is empty: point it at pytorch-fid's pt_inception-2015-12-05 weights "
                        "(.pth or converted .npz); nothing is downloaded")
    if config.data_source not in ("config", "run"):
        raise EvalError(f"config.data_source must be 'config' or 'run', got {config.data_source!r}")
    if config.data_source == "config" and config.data is None:
        raise EvalError("config.data is not set: give the evaluation data (a data config) or use "
                        "data_source='run' for the dataset the run trained on")
    order = config.protocol.order
    if order not in ("first", "shuffled", "coco_draw"):
        raise EvalError("config.protocol.order must be first, shuffled or coco_draw, got "
                        f"{order!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved choices of one evaluation (config + what the run and data allow)."""
    settings: object               # inference.SampleSettings
    scales: tuple[float, ...]      # decoder guidance scales sampled; [0] is the main one
    sweep: tuple[float, ...]       # config.guidance_sweep
    seed: int
    num_samples: int
    batch_size: int
    priors: tuple[str, ...]        # priors whose z_i are compared with the true z_i
    shapes: bool
    fid: bool
    kid: bool
    kid_subset_size: int
    kid_subsets: int
    clip_fd: bool
    clip_score: bool
    precision_recall: bool
    pr_k: int
    keep_images: bool
    grid_images: int


def make_plan(config, settings, pipe, data_name: str) -> Plan:
    """The Plan for a loaded pipeline and the evaluation data's name; errors for choices the
    run or the data can't serve."""
    if settings.prior == "ar" and pipe.ar_prior is None:
        raise EvalError("config.sampling.prior='ar' but the run has no AR prior")
    if settings.prior == "diffusion" and pipe.prior is None:
        raise EvalError("config.sampling.prior='diffusion' but the run has no diffusion prior")
    m = config.metrics
    is_shapes = data_name == "shapes"
    shapes = _choice(config, "shapes_accuracy", is_shapes)
    if shapes and not is_shapes:
        raise EvalError("metrics.shapes_accuracy needs the built-in shapes data (data.name="
                        f"'shapes'), not {data_name!r}")
    want_prior = bool(m.prior)
    priors = tuple(name for name, stage, on in (
        ("diffusion", pipe.prior, want_prior),
        ("ar", pipe.ar_prior, want_prior and bool(m.prior_ar))) if on and stage)
    sweep = tuple(float(g) for g in (config.guidance_sweep or ()))
    main = float(settings.decoder_guidance)
    return Plan(settings=settings, scales=(main,) + tuple(g for g in sweep if g != main),
                sweep=sweep, seed=int(config.seed), num_samples=int(config.protocol.num_samples),
                batch_size=int(config.sampling.batch_size), priors=priors, shapes=shapes,
                fid=inception_metric(config, "fid"), kid=inception_metric(config, "kid"),
                kid_subset_size=int(m.kid_subset_size),
                kid_subsets=int(m.kid_subsets), clip_fd=bool(m.clip_fd),
                clip_score=bool(m.clip_score),
                precision_recall=bool(m.precision_recall),
                pr_k=int(m.pr_k), keep_images=bool(config.save_images),
                grid_images=int(config.grid_images))
