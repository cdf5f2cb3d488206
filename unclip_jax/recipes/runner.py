"""The whole-stack runner: train every unCLIP stage in order, then sample and report.

    python -m unclip_jax.main --config=experiments/shapes.py --workdir=runs/shapes
    python -m unclip_jax.main --config=experiments/webdata.py --workdir=runs/webdata ...

A whole-stack config (`pipeline = "unclip"`) names its recipe (`config.recipe`: "shapes", the
default, or "webdata"); the recipe module (unclip_jax/recipes/<recipe>.py) holds only what
differs between them, as optional hooks:
  prepare(config, workdir) -> config     inputs the run makes itself (smoke runs) and paths
  check(config, workdir, cfgs)           bad input: raise before anything is written
  adapt_stage(name, stage_config, config)  stage fields dictated by the recipe's CLIP
  embed_data(config)                     the data the embedding cache encodes (default: the
                                         clip stage's training data)
  tokenizer_dir(config, workdir)         default: <workdir>/clip/tokenizer (trained there)
  STEPS = {name: fn(run)}                steps of config.order the runner does not know
                                         (shapes: "report"; webdata: "clip", "evaluate")
The runner knows the stages (each trains in its own sub-workdir with the generic trainer, so
re-running the command resumes an interrupted stage and skips finished ones), "embed" (the CLIP
embedding cache) and "samples" (a PNG grid for fixed prompts); the cache, samples and reports are
written once (delete them to redo). The config's `stages.<name>` are ordinary stage configs; the
runner only wires paths between them (tokenizer, cache, codec) so they can't disagree.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time

import jax
import ml_collections

from unclip_jax import paths
from unclip_jax.console import say
from unclip_jax.images import save_grid
from unclip_jax.inference import Pipeline, SampleSettings
from unclip_jax.stages import UNCLIP_STAGES


def recipe_module(config):
    name = config.get("recipe", "shapes")
    try:
        return importlib.import_module(f"unclip_jax.recipes.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"config.recipe: unknown recipe {name!r} (shapes or webdata)") from e


def _hook(recipe, name, default=None):
    return getattr(recipe, name, default)


def stage_configs(config, workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """Each stage's training config with the paths between stages filled in (absolute)."""
    recipe = recipe_module(config)
    w = str(paths.path(workdir))
    tok_dir = _hook(recipe, "tokenizer_dir", lambda c, w: os.path.join(w, "clip", "tokenizer"))(
        config, w)
    adapt = _hook(recipe, "adapt_stage", lambda name, c, config: None)
    cache_dir = os.path.join(w, "embed")
    out = {}
    for name in UNCLIP_STAGES:
        if name not in config.stages:
            continue
        c = config.stages[name].copy_and_resolve_references()
        with c.unlocked():
            c.seed = int(config.seed)
            if name == "clip":
                c.data = source_data(config, int(c.model.image_size))
                c.tokenizer.dir = tok_dir
            elif name in ("diffusion_prior", "ar_prior"):
                c.data = _cache_data(cache_dir, config, None)
                c.tokenizer.dir = tok_dir
                if name == "ar_prior":
                    c.model.codec_path = os.path.join(w, "ar_prior", "codec.npz")
            elif name == "decoder":
                c.data = _cache_data(cache_dir, config, int(c.model.image_size))
            elif name == "upsampler":
                c.data = source_data(config, int(c.model.image_size))
            adapt(name, c, config)
        out[name] = c
    return out


def source_data(config, resolution: int):
    """The run's dataset (config.data) at one stage's image size."""
    d = config.data.copy_and_resolve_references()
    with d.unlocked():
        d.resolution = resolution
    return d


def _cache_data(cache_dir: str, config, image_resolution: int | None):
    from unclip_jax.data import default_data_config
    d = default_data_config("embed_cache")
    d.cache_dir = cache_dir
    d.num_threads = int(config.data.num_threads)
    if image_resolution:
        # The decoder trains on the cached embeddings joined with the images at its own size.
        d.join_images = True
        d.resolution = image_resolution
        d.source = source_data(config, image_resolution)
    return d


def _finished(workdir: str, num_steps: int) -> bool:
    d = paths.path(workdir) / "checkpoints"
    if not d.is_dir():
        return False
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()]
    return bool(steps) and max(steps) >= num_steps


def _train_stage(name: str, cfg, workdir: str, timings: dict):
    from unclip_jax.train.trainer import train
    sub = os.path.join(workdir, name)
    if _finished(sub, int(cfg.train.num_steps)):
        say(f"[{name}] finished earlier ({cfg.train.num_steps} steps): skipped")
        return
    say(f"[{name}] training {cfg.train.num_steps} steps in {sub}")
    t = time.perf_counter()
    out = train(cfg, sub)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
    if out["status"] != "done":
        raise SystemExit(f"[{name}] stopped ({out['status']}) at step {out['step']}; re-run the "
                         "same command to resume")


def cache_complete(workdir: str) -> bool:
    return (paths.path(workdir) / "embed" / "complete.json").exists()


def _embed(run: "Run"):
    from unclip_jax import embed as embed_lib
    config, workdir = run.config, run.workdir
    out = os.path.join(workdir, "embed")
    marker = os.path.join(out, "complete.json")
    if cache_complete(workdir):
        say("[embed] cache complete: skipped")
        return
    say(f"[embed] writing CLIP embeddings of the dataset to {out}")
    t = time.perf_counter()
    data = _hook(run.recipe, "embed_data", lambda c: run.cfgs["clip"].data)(config)
    e = ml_collections.ConfigDict(dict(
        data=data,
        embed=dict(config.embed.to_dict(), encoder="unclip_jax.inference:clip_encoder",
                   clip_workdir=os.path.join(workdir, "clip"))))
    manifests = embed_lib.embed(e, out, process_index=jax.process_index(),
                                process_count=jax.process_count(), log=lambda s: None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("embed_done")
    if jax.process_index() == 0:
        paths.write_text(marker, json.dumps({s: m["num_examples"] for s, m in manifests.items()}))
    run.timings["embed"] = time.perf_counter() - t


def check_stages(config, workdir: str, cfgs: dict):
    """Bad input common to the recipes, before anything is written: every stage config
    validates, and a finished embedding cache was written with the tokenizer the stages and
    sampling will use (embed.check_cache_tokens)."""
    from unclip_jax.stages import get_stage
    for name, c in cfgs.items():
        try:
            get_stage(c.stage).validate(c)
        except (ValueError, KeyError) as e:
            raise ValueError(f"config.stages.{name}: {e}") from None
    tok_dir = next((str(c.tokenizer.dir) for n, c in cfgs.items()
                    if n in ("diffusion_prior", "ar_prior")), "")
    if cache_complete(workdir) and tok_dir and paths.path(tok_dir).is_dir():
        from unclip_jax.data.tokenizer import Tokenizer
        from unclip_jax.embed import check_cache_tokens
        check_cache_tokens(str(paths.path(workdir) / "embed"),
                           Tokenizer.load(tok_dir), tok_dir)


def settings_from_config(config) -> SampleSettings:
    fields = {f.name for f in SampleSettings.__dataclass_fields__.values()}
    return SampleSettings(**{k: v for k, v in config.sample.settings.items() if k in fields})


def _samples(run: "Run"):
    config, workdir = run.config, run.workdir
    out = os.path.join(workdir, "samples")
    path = os.path.join(out, "grid.png")
    if paths.path(path).exists():
        say(f"[samples] {path} exists: skipped")
        return
    s = config.sample
    prompts = [p for p in s.prompts for _ in range(int(s.per_prompt))]
    t = time.perf_counter()
    res = run.pipe().text_to_image(prompts, seed=int(s.seed), settings=settings_from_config(config))
    run.timings["samples"] = time.perf_counter() - t
    save_grid(res["images"], path, int(s.per_prompt), labels=list(s.prompts))
    paths.write_text(os.path.join(out, "settings.json"), json.dumps(
        {"prompts": list(s.prompts), "per_prompt": int(s.per_prompt), "seed": int(s.seed),
         **dataclass_dict(settings_from_config(config))}, indent=2))
    say(f"[samples] wrote {path} (one row per prompt: {', '.join(s.prompts)})")


def dataclass_dict(d) -> dict:
    return dataclasses.asdict(d)


@dataclasses.dataclass
class Run:
    """What a step of config.order gets: the resolved config, the workdir, the stage configs,
    the timings so far, and the trained pipeline (loaded once, on first use)."""
    config: object
    workdir: str
    cfgs: dict
    timings: dict
    recipe: object
    _pipe: Pipeline | None = None

    def pipe(self) -> Pipeline:
        if self._pipe is None:
            self._pipe = Pipeline.from_workdir(self.workdir)
        return self._pipe


def run_pipeline(config, workdir: str) -> dict:
    recipe = recipe_module(config)
    config = _hook(recipe, "prepare", lambda c, w: c)(config, workdir)
    cfgs = stage_configs(config, workdir)
    steps = dict(_hook(recipe, "STEPS", {}))
    for name in config.order:
        if name not in cfgs and name not in steps and name not in ("embed", "samples"):
            raise ValueError(f"config.order: unknown step {name!r}")
    _hook(recipe, "check", lambda c, w, s: None)(config, workdir, cfgs)
    check_stages(config, workdir, cfgs)
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    tfile = os.path.join(workdir, "timings.json")
    timings = json.loads(paths.path(tfile).read_text()) if paths.path(tfile).exists() else {}
    run = Run(config, workdir, cfgs, timings, recipe)
    t0 = time.perf_counter()
    for name in config.order:
        if name in steps:
            steps[name](run)
        elif name in cfgs:
            _train_stage(name, cfgs[name], workdir, timings)
        elif name == "embed":
            _embed(run)
        else:
            _samples(run)
        if jax.process_index() == 0:
            paths.write_text(tfile, json.dumps(timings, indent=2))
    total = time.perf_counter() - t0
    report = os.path.join(workdir, "report.md")
    say(f"[done] {', '.join(config.order)} in {total:.0f} s"
        + (f"; report in {report}" if paths.path(report).exists() else ""))
    return {"workdir": workdir, "timings": timings, "seconds": total}
