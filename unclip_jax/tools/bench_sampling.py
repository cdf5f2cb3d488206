"""Sampling speed of a stage's model: the compiled sampler loop against its model calls.

  python -m unclip_jax.tools.bench_sampling --config=experiments/<file>.py [--steps=50] [--batch=16]
                                      [--guidance=3.0] [--repeats=3] [--json=out.json]

For the decoder, upsampler and diffusion_prior stages, with randomly initialised parameters (the
stage's own init) and random conditioning, this times
  loop  the jitted `unclip_jax.diffusion.sample` (DDIM, eta 0, `--steps` respaced steps; with
        classifier-free guidance by batch doubling where the stage has a null condition:
        decoder and diffusion prior), median of --repeats runs after compilation;
  call  one jitted model call at the batch the loop feeds the model (2 x batch when guided),
        median of many calls;
and reports overhead = loop / (steps x call) (1.0 = the loop costs only its model calls),
images/s = batch / loop and s/image. Timings are per stage; a text->image pipeline timing can
be added by handing `measure()` another (sample_fn, call_fn) pair.

For the ar_prior stage it times the token sampler (`models.ar_prior.sample_ar_prior`, jitted)
with the key/value cache and without it (the decoder re-run over the sequence per token), the
median of --repeats runs after compilation each, and the caption encoder alone (run once by
both); it reports the speed-up, tokens/s and whether both drew the same tokens. `--guidance`
defaults to 1.0 there; fewer tokens than the config's: --config.model.pca_components=N-1.
  python -m unclip_jax.tools.bench_sampling --config=experiments/paper/ar_prior.py --batch=1 \
      --repeats=1 --config.model.pca_components=15 --config.model.dtype=float32
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: XLA:CPU flags and the allocator


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from unclip_jax import diffusion

STAGES = ("decoder", "upsampler", "diffusion_prior", "ar_prior")


@dataclasses.dataclass
class SamplerSpec:
    """What the sampler needs for one stage: model_fn(params, x, t, cond), conditioning and
    the `diffusion.sample` keyword arguments (everything but model, schedule, shape, rng)."""
    model_fn: Callable
    params: Any
    schedule: Any              # respaced to the benchmarked number of steps
    shape: tuple
    cond: Any
    uncond: Any                # None: no guidance
    sample_kwargs: dict


def _init_params(stage, model, config, seed: int = 0):
    example = {k: jnp.asarray(v) for k, v in stage.example_batch(config, 1).items()}
    impl = str(config.train.init_prng)   # as the trainer: threefry's program compiles slowest
    key = jax.random.PRNGKey(seed) if impl == "threefry2x32" else jax.random.key(seed, impl=impl)
    variables = jax.jit(lambda r: stage.init(model, r, example))(key)
    return nn.meta.unbox(variables)["params"]


def _decoder_spec(stage, model, params, config, batch, rng, guidance):
    from unclip_jax.stages.decoder import schedule_for
    m, d = config.model, config.diffusion
    k_z, k_t = jax.random.split(rng)
    cond = {"drop_image": jnp.zeros((batch,), bool), "drop_text": jnp.zeros((batch,), bool)}
    if int(m.clip_dim):
        z = jax.random.normal(k_z, (batch, int(m.clip_dim)))
        cond["image_emb"] = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    if int(m.text_depth):
        cond["tokens"] = jax.random.randint(k_t, (batch, int(m.text_ctx)), 1,
                                            max(int(m.text_vocab), 2))
        cond["token_mask"] = jnp.ones((batch, int(m.text_ctx)), bool)
    uncond = None
    if guidance != 1.0 and ("image_emb" in cond or "tokens" in cond):
        uncond = dict(cond, drop_image=jnp.ones((batch,), bool),
                      drop_text=jnp.ones((batch,), bool))

    def model_fn(p, x, t, c):
        return model.apply({"params": p}, x, t, c.get("image_emb"), c.get("tokens"),
                           c.get("token_mask"), drop_image_emb=c["drop_image"],
                           drop_text=c["drop_text"])

    learned = bool(m.learn_sigma)
    size = int(m.image_size)
    return SamplerSpec(model_fn, params, schedule_for(d["schedule"], d["num_timesteps"]),
                       (batch, size, size, 3), cond, uncond,
                       dict(parameterization=d["parameterization"], learned_sigma=learned,
                            guidance_scale=guidance if uncond is not None else 1.0,
                            clip_x0=1.0))


def _upsampler_spec(stage, model, params, config, batch, rng, guidance):
    from unclip_jax.stages.decoder import schedule_for
    m, d = config.model, config.diffusion
    size, low = int(m.image_size), int(m.low_res_size)
    low_res = jax.random.uniform(rng, (batch, low, low, 3), minval=-1.0, maxval=1.0)
    # Resized once outside the loop, as the pipeline does; the model sees full-size inputs.
    cond = {"low_res": jax.image.resize(low_res, (batch, size, size, 3), "linear")}

    def model_fn(p, x, t, c):
        return model.apply({"params": p}, x, t, c["low_res"])

    return SamplerSpec(model_fn, params, schedule_for(d["schedule"], d["num_timesteps"]),
                       (batch, size, size, 3), cond, None,
                       dict(parameterization=d["parameterization"], clip_x0=1.0))


def _caption_batch(stage, config, batch, rng):
    """The stage's example batch with a random unit z_t and random caption tokens/encodings
    (both priors)."""
    m = config.model
    ex = {k: jnp.asarray(v) for k, v in stage.example_batch(config, batch).items()}
    keys = jax.random.split(rng, 3)
    z_t = jax.random.normal(keys[0], ex["text_embedding"].shape)
    ex["text_embedding"] = z_t / jnp.linalg.norm(z_t, axis=-1, keepdims=True)
    if "tokens" in ex:
        ex["tokens"] = jax.random.randint(keys[1], ex["tokens"].shape, 1,
                                          max(int(m.vocab_size), 2))
    else:
        ex["token_embeddings"] = jax.random.normal(keys[2], ex["token_embeddings"].shape)
    return ex


def _prior_spec(stage, model, params, config, batch, rng, guidance):
    from unclip_jax.models.prior import EmbeddingScaling, make_cond
    from unclip_jax.stages.diffusion_prior import schedule_from_config
    m = config.model
    ex = _caption_batch(stage, config, batch, rng)
    cond = make_cond(ex, EmbeddingScaling.fixed(float(m.scale)))
    cond["drop"] = jnp.zeros((batch,), bool)
    uncond = dict(cond, drop=jnp.ones((batch,), bool)) if guidance != 1.0 else None

    def model_fn(p, x, t, c):
        return model.apply({"params": p}, x, t, c)

    return SamplerSpec(model_fn, params, schedule_from_config(config),
                       (batch, int(m.embed_dim)), cond, uncond,
                       dict(parameterization="x0",
                            guidance_scale=guidance if uncond is not None else 1.0))


def stage_sampler(config, *, steps: int, batch: int, guidance: float | None = None,
                  seed: int = 0) -> SamplerSpec:
    """The DDIM sampler set-up of `config.stage` with random params and conditioning."""
    from unclip_jax.stages import get_stage
    if config.stage not in STAGES or config.stage == "ar_prior":
        raise ValueError(f"config.stage {config.stage!r}: diffusion sampling benchmarks support "
                         f"{STAGES[:-1]} (ar_prior: benchmark_ar_sampling)")
    stage = get_stage(config.stage)
    model = stage.build_model(config)
    params = _init_params(stage, model, config, seed)
    if guidance is None:
        guidance = float(config.diffusion.guidance_scale)
    make = {"decoder": _decoder_spec, "upsampler": _upsampler_spec,
            "diffusion_prior": _prior_spec}[config.stage]
    spec = make(stage, model, params, config, batch, jax.random.PRNGKey(seed + 1), guidance)
    spec.schedule = diffusion.respace(spec.schedule, f"ddim{steps}")
    return spec


def _median_time(fn, args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(sample_fn, sample_args, call_fn, call_args, *, steps: int, batch: int,
            repeats: int = 3, call_repeats: int = 10) -> dict:
    """Time a compiled sampler and one of its model calls (both jitted functions; compiled and
    warmed here). Usable for any sampler: a stage's loop or, later, a whole pipeline."""
    t = time.perf_counter()
    jax.block_until_ready(sample_fn(*sample_args))
    compile_s = time.perf_counter() - t
    jax.block_until_ready(call_fn(*call_args))
    loop_s = _median_time(sample_fn, sample_args, repeats)
    call_s = _median_time(call_fn, call_args, call_repeats)
    return {"steps": steps, "batch": batch, "loop_s": loop_s, "model_call_s": call_s,
            "overhead": loop_s / (steps * call_s), "images_per_s": batch / loop_s,
            "s_per_image": loop_s / batch, "first_call_s": compile_s}


def benchmark_sampling(config, *, steps: int = 50, batch: int = 16,
                       guidance: float | None = None, repeats: int = 3) -> dict:
    spec = stage_sampler(config, steps=steps, batch=batch, guidance=guidance)
    kw = spec.sample_kwargs

    @jax.jit
    def sample_fn(params, rng, cond, uncond):
        return diffusion.sample(lambda x, t, c: spec.model_fn(params, x, t, c), spec.schedule,
                                spec.shape, rng, cond, uncond=uncond, method="ddim", **kw)

    guided = spec.uncond is not None
    n = 2 * batch if guided else batch
    # The loop feeds the model [cond; uncond] as one doubled batch: time the same call.
    both = (jax.tree.map(lambda c, u: jnp.concatenate([c, u]), spec.cond, spec.uncond)
            if guided else spec.cond)
    x = jax.random.normal(jax.random.PRNGKey(2), (n,) + spec.shape[1:])
    t = jnp.full((n,), int(spec.schedule.timestep_map[-1]), jnp.int32)
    call_fn = jax.jit(spec.model_fn)
    r = measure(sample_fn, (spec.params, jax.random.PRNGKey(3), spec.cond, spec.uncond),
                call_fn, (spec.params, x, t, both), steps=steps, batch=batch, repeats=repeats)
    r.update(stage=config.stage, guided=guided, model_batch=n,
             guidance_scale=float(kw.get("guidance_scale", 1.0)),
             device=jax.devices()[0].device_kind,
             params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(spec.params))))
    return r


def benchmark_ar_sampling(config, *, batch: int = 1, guidance: float | None = None,
                          repeats: int = 3) -> dict:
    """AR prior token sampling with and without the key/value cache (module docstring)."""
    from unclip_jax.models.ar_prior import ARPrior, _cond, sample_ar_prior
    from unclip_jax.stages import get_stage
    from unclip_jax.stages.ar_prior import text_scale
    stage = get_stage("ar_prior")
    stage.validate(config)
    model = stage.build_model(config)
    params = _init_params(stage, model, config)
    ex = _caption_batch(stage, config, batch, jax.random.PRNGKey(1))
    ex.pop("ar_tokens")
    g = 1.0 if guidance is None else float(guidance)
    ts = text_scale(config)
    rng = jax.random.PRNGKey(3)
    r = {"stage": "ar_prior", "batch": batch, "tokens": model.num_tokens, "guidance_scale": g,
         "guided": g != 1.0, "model_batch": 2 * batch if g != 1.0 else batch}
    out = {}
    for name, cache in (("cached", True), ("uncached", False)):
        fn = jax.jit(lambda p, b, k, cache=cache: sample_ar_prior(
            model, p, b, k, guidance_scale=g, text_scale=ts, kv_cache=cache))
        t = time.perf_counter()
        out[name] = np.asarray(fn(params, ex, rng))
        r[f"{name}_first_call_s"] = time.perf_counter() - t
        r[f"{name}_s"] = _median_time(fn, (params, ex, rng), repeats)
    cond = _cond(ex, ts)
    cond["drop"] = jnp.zeros((batch,), bool)
    prefix = jax.jit(lambda p, c: model.apply({"params": p}, c, method=ARPrior.prefix))
    jax.block_until_ready(prefix(params, cond))
    r["caption_encoder_s"] = _median_time(prefix, (params, cond), repeats)
    r.update(speedup=r["uncached_s"] / r["cached_s"],
             tokens_per_s_cached=batch * r["tokens"] / r["cached_s"],
             tokens_per_s_uncached=batch * r["tokens"] / r["uncached_s"],
             same_tokens=bool(np.array_equal(out["cached"], out["uncached"])),
             device=jax.devices()[0].device_kind,
             params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
             dec_width=int(model.dec_width), dec_depth=int(model.dec_depth),
             text_ctx=int(model.text_ctx), dtype=str(np.dtype(model.dtype)))
    return r


def format_ar_result(r: dict) -> str:
    rows = [
        ("stage / device", f"ar_prior on {r['device']} ({r['params']:,} params, decoder "
                           f"{r['dec_width']} wide x {r['dec_depth']}, {r['dtype']})"),
        ("sampler", f"{r['tokens']} tokens after a {r['text_ctx'] + 1}-position prefix, batch "
                    f"{r['batch']}" + (f", guided (scale {r['guidance_scale']:g})"
                                       if r["guided"] else ", unguided")),
        ("with kv cache", f"{r['cached_s']:.3f} s ({r['tokens_per_s_cached']:.2f} tokens/s; "
                          f"first call incl. compile {r['cached_first_call_s']:.1f} s)"),
        ("without (reference)", f"{r['uncached_s']:.3f} s ({r['tokens_per_s_uncached']:.2f} "
                                f"tokens/s; first call {r['uncached_first_call_s']:.1f} s)"),
        ("speed-up", f"{r['speedup']:.2f}x (caption encoder, run once by both: "
                     f"{r['caption_encoder_s']:.3f} s)"),
        ("same tokens", str(r["same_tokens"])),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def format_result(r: dict) -> str:
    rows = [
        ("stage / device", f"{r['stage']} on {r['device']} ({r['params']:,} params)"),
        ("sampler", f"DDIM {r['steps']} steps, batch {r['batch']}"
                    + (f", guided (scale {r['guidance_scale']:g}, model batch {r['model_batch']})"
                       if r["guided"] else ", unguided")),
        ("loop (median)", f"{r['loop_s']:.3f} s (first call incl. compile {r['first_call_s']:.1f} s)"),
        ("one model call", f"{r['model_call_s'] * 1e3:.2f} ms at batch {r['model_batch']}"),
        ("overhead", f"{r['overhead']:.3f} x steps x model call (ideal 1.0)"),
        ("images/s", f"{r['images_per_s']:.3f} ({r['s_per_image']:.3f} s/image)"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv):
    del argv
    from unclip_jax import console
    console.quiet_terminal()  # library INFO logging (compiles, Orbax) is not for the terminal
    if FLAGS.config.stage == "ar_prior":
        r = benchmark_ar_sampling(FLAGS.config, batch=FLAGS.batch, guidance=FLAGS.guidance,
                                  repeats=FLAGS.repeats)
        console.report(format_ar_result(r), r, FLAGS.json)
        return
    r = benchmark_sampling(FLAGS.config, steps=FLAGS.steps, batch=FLAGS.batch,
                           guidance=FLAGS.guidance, repeats=FLAGS.repeats)
    console.report(format_result(r), r, FLAGS.json)


if __name__ == "__main__":
    from unclip_jax import console
    FLAGS = flags.FLAGS
    console.define_tool_flags()
    flags.DEFINE_integer("steps", 50, "DDIM steps (diffusion stages).")
    flags.DEFINE_integer("batch", 16, "Images (or embeddings) per sampler call.")
    flags.DEFINE_float("guidance", None, "Guidance scale (default: config.diffusion.guidance_scale "
                       "or 3.0; 1.0 turns guidance off).")
    flags.DEFINE_integer("repeats", 3, "Timed sampler runs (median reported).")
    console.run_app(main)
