"""Sample from the main job's trained stages: text -> image, and the paper's image manipulations.

  python -m unclip_jax.sample [text|variations|interpolate|textdiff] --workdir=W --out=DIR ...

  python -m unclip_jax.sample --workdir=runs/shapes --prompt="a red circle" --num=4 --out=out/
  python -m unclip_jax.sample --workdir=runs/shapes --prompts_file=prompts.txt --prior=ar ...
  python -m unclip_jax.sample variations  --workdir=W --image=in.png --num=4 --eta=1.0 --out=out/
  python -m unclip_jax.sample interpolate --workdir=W --image=a.png --image2=b.png --out=out/
  python -m unclip_jax.sample textdiff --workdir=W --image=in.png --caption_from="a red circle"
      --caption_to="a blue circle" --steps=5 --out=out/

The command word comes first or anywhere among the flags; `text` is the default. Writes PNGs (one
per image for text, a strip for manipulations) and settings.json into --out; the workdir is only
read (EMA weights unless --raw). A converted Karlo workdir (unclip_jax.convert) works too: text
with Karlo's preset; the manipulations need its vision tower (convert --image_encoder). Errors
in the input are reported in one line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: it takes effect only then

# Nothing below imports JAX at module level: `run` imports it after the host setup.
from absl import app, flags

COMMANDS = ("text", "variations", "interpolate", "textdiff")
# The flags each command reads beyond the common ones; giving another command's flag is an error.
COMMAND_FLAGS = {
    "text": ("prompt", "prompts_file", "num"),
    "variations": ("image", "num", "eta"),
    "interpolate": ("image", "image2", "steps", "x_t"),
    "textdiff": ("image", "caption_from", "caption_to", "steps", "max_theta"),
}


def define_flags(fv: flags.FlagValues) -> None:
    """The sample flags, on `fv`: flags.FLAGS for the command, a fresh FlagValues for `run`."""
    f = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "The main job's workdir (read only).", **f)
    flags.DEFINE_string("out", None, "Output directory (created).", **f)
    flags.DEFINE_integer("seed", 0, "Random seed.", **f)
    flags.DEFINE_bool("raw", False, "Use the raw weights instead of the EMA.", **f)
    flags.DEFINE_bool("no_upsample", False, "Manipulations: stop at the decoder's resolution.",
                      **f)
    # Sampling settings (unclip_jax.inference.SampleSettings).
    flags.DEFINE_enum("preset", "", ["", "karlo"], "Sampling settings preset: 'karlo' is "
                      "Karlo's (prior 25 steps at guidance 4, decoder 25 at 8, super-res 7), "
                      "the default for a converted Karlo workdir; flags given explicitly still "
                      "apply.", **f)
    flags.DEFINE_enum("prior", "diffusion", ["diffusion", "ar"], "Which prior makes z_i.", **f)
    flags.DEFINE_string("prior_steps", "64", "Diffusion prior steps (a respacing: '64', "
                        "'ddim25').", **f)
    flags.DEFINE_enum("prior_method", "ddpm", ["ddpm", "ddim"], "Diffusion prior sampler.", **f)
    flags.DEFINE_float("prior_guidance", 1.0, "Diffusion prior guidance scale.", **f)
    flags.DEFINE_enum("prior_var_type", "config", ["config", "fixed_small", "fixed_large",
                                                   "analytic"],
                      "Diffusion prior ddpm variance; 'config': the prior config's "
                      "diffusion.var_type ('analytic' needs the prior's "
                      "analytic_variance.json, written by its training).", **f)
    flags.DEFINE_integer("best_of", 2, "Diffusion prior candidates, the one closest to the text "
                         "embedding kept (paper: 2).", **f)
    flags.DEFINE_float("ar_temperature", 1.0, "AR prior sampling temperature.", **f)
    flags.DEFINE_integer("ar_top_k", 0, "AR prior top-k (0: all codes).", **f)
    flags.DEFINE_bool("ar_kv_cache", True, "AR prior: key/value cache (--noar_kv_cache: re-run "
                      "the decoder per token, the slower reference; same tokens).", **f)
    flags.DEFINE_string("decoder_steps", "50", "Decoder steps (a respacing: '50', 'ddim25').",
                        **f)
    flags.DEFINE_enum("decoder_sampler", "ddpm", ["ddpm", "ddim"], "Decoder sampler.", **f)
    flags.DEFINE_float("decoder_eta", 0.0, "Decoder DDIM eta.", **f)
    flags.DEFINE_float("decoder_guidance", 3.0, "Decoder classifier-free guidance scale.", **f)
    flags.DEFINE_multi_string("upsampler_steps", ["ddim15"], "Upsampler steps (a respacing): "
                              "once for every upsampler, or once per upsampler in chain order "
                              "(paper: --upsampler_steps=ddim27 --upsampler_steps=ddim15).", **f)
    flags.DEFINE_list("upsamplers", None, "Upsampler stage directories to chain, in order "
                      "(names under --workdir or paths, e.g. upsampler_256,upsampler_1024; "
                      "empty: none). Default: every upsampler* stage, by numeric suffix.", **f)
    flags.DEFINE_float("upsampler_eta", 0.0, "Upsampler DDIM eta.", **f)
    # Per command (COMMAND_FLAGS).
    flags.DEFINE_multi_string("prompt", [], "text: a prompt", **f)
    flags.DEFINE_string("prompts_file", None, "text: a file of prompts, one per line.", **f)
    flags.DEFINE_integer("num", None, "text: images per prompt (default 1); variations: "
                         "variations (default 4).", **f)
    flags.DEFINE_string("image", None, "variations, interpolate, textdiff: the input image.", **f)
    flags.DEFINE_string("image2", None, "interpolate: the second image.", **f)
    flags.DEFINE_float("eta", 1.0, "variations: DDIM eta of the decoder from the inverted "
                       "latent (0: the reconstruction).", **f)
    flags.DEFINE_integer("steps", 5, "interpolate, textdiff: images in the strip.", **f)
    flags.DEFINE_enum("x_t", "fixed", ["fixed", "slerp"], "interpolate: the decoder's x_T, fixed "
                      "or slerped between the two inverted latents.", **f)
    flags.DEFINE_string("caption_from", None, "textdiff: the caption of the input image.", **f)
    flags.DEFINE_string("caption_to", None, "textdiff: the caption to move towards.", **f)
    flags.DEFINE_float("max_theta", 0.5, "textdiff: the largest interpolation weight.", **f)


# flag -> SampleSettings field, for the flags a --preset leaves to the user.
_SETTING_FLAGS = {"prior_steps": "prior_steps", "prior_method": "prior_method",
                  "prior_guidance": "prior_guidance", "best_of": "num_candidates",
                  "decoder_steps": "decoder_steps", "decoder_sampler": "decoder_method",
                  "decoder_guidance": "decoder_guidance", "upsampler_steps": "upsampler_steps"}


def _settings(a):
    s = _flag_settings(a)
    from unclip_jax import karlo
    # A converted Karlo workdir samples with Karlo's settings unless told otherwise.
    if a.preset == "karlo" or (not a["preset"].present and a.workdir
                               and karlo.is_karlo_workdir(a.workdir)):
        s = karlo.preset_settings(s, keep={f for n, f in _SETTING_FLAGS.items() if a[n].present})
    return s


def _flag_settings(a):
    from unclip_jax.inference import SampleSettings
    return SampleSettings(
        prior=a.prior, prior_steps=a.prior_steps, prior_method=a.prior_method,
        prior_guidance=a.prior_guidance, prior_var_type=a.prior_var_type,
        num_candidates=a.best_of,
        ar_temperature=a.ar_temperature, ar_top_k=a.ar_top_k, ar_kv_cache=a.ar_kv_cache,
        decoder_steps=a.decoder_steps,
        decoder_method=a.decoder_sampler, decoder_eta=a.decoder_eta,
        decoder_guidance=a.decoder_guidance,
        upsampler_steps=a.upsampler_steps[0] if len(a.upsampler_steps) == 1
        else tuple(a.upsampler_steps),
        upsampler_eta=a.upsampler_eta)


def _check_command(command: str, fv: flags.FlagValues) -> None:
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}: use one of {', '.join(COMMANDS)}")
    for name in sorted({n for names in COMMAND_FLAGS.values() for n in names}):
        if fv[name].present and name not in COMMAND_FLAGS[command]:
            raise ValueError(f"--{name} is not a flag of the {command} command")
    for name in ("workdir", "out"):
        if not fv[name].value:
            raise ValueError(f"--{name} is required")
    needs = {"variations": ("image",), "interpolate": ("image", "image2"),
             "textdiff": ("image", "caption_from", "caption_to")}.get(command, ())
    for name in needs:
        if fv[name].value is None:
            raise ValueError(f"the {command} command needs --{name}")


def _prompts(a) -> list[str]:
    prompts = list(a.prompt)
    if a.prompts_file:
        from unclip_jax import paths
        if not paths.path(a.prompts_file).is_file():
            raise FileNotFoundError(f"prompts file {a.prompts_file} does not exist")
        prompts += [line for line in paths.path(a.prompts_file).read_text().splitlines()
                    if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts_file")
    for k, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {k} is empty")
    return prompts


def run(argv: list[str]) -> dict:
    """`python -m unclip_jax.sample` in-process: argv is the command line without the program
    name. Returns {"images": [N, H, W, 3] in [-1, 1], "record": what settings.json holds}."""
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        words = fv(["unclip_jax.sample"] + list(argv))[1:]
    except flags.Error as e:
        raise ValueError(str(e)) from None
    if len(words) > 1:
        raise ValueError(f"one command at most, got {' '.join(words)}")
    return sample(words[0] if words else "text", fv)


def sample(command: str, a) -> dict:
    """Run `command` with the parsed flags `a` (a FlagValues)."""
    _check_command(command, a)
    import numpy as np

    from unclip_jax import manipulate, paths
    from unclip_jax.images import read_image, save_grid, write_image
    from unclip_jax.inference import Pipeline

    settings = _settings(a)
    # Inputs are checked before the (slow) model loading.
    prompts = _prompts(a) if command == "text" else None
    num = a.num if a.num is not None else (1 if command == "text" else 4)
    images = {k: read_image(getattr(a, k)) for k in ("image", "image2")
              if getattr(a, k, None)}
    paths.check_bucket(a.out)
    pipe = Pipeline.from_workdir(a.workdir, ema=not a.raw, upsamplers=a.upsamplers)
    up = not a.no_upsample
    record = {"command": command, "workdir": str(paths.path(a.workdir)), "seed": a.seed,
              "out": str(paths.path(a.out)),
              "ema": not a.raw, **dataclasses.asdict(settings),
              "upsamplers": pipe.upsampler_dirs}
    if command == "text":
        rows = [p for p in prompts for _ in range(num)]
        out = pipe.text_to_image(rows, seed=a.seed, settings=settings)["images"]
        files = []
        for k, (p, img) in enumerate(zip(rows, out)):
            name = f"{k:04d}.png"
            write_image(img, os.path.join(a.out, name))
            files.append({"file": name, "prompt": p})
        record.update(prompts=prompts, num=num, files=files)
    else:
        if command == "variations":
            out = manipulate.variations(pipe, images["image"], num=num, eta=a.eta, seed=a.seed,
                                        settings=settings, upsample=up)
            record.update(image=a.image, num=num, eta=a.eta)
        elif command == "interpolate":
            th = np.linspace(0.0, 1.0, a.steps)
            out = manipulate.interpolate(pipe, images["image"], images["image2"], th,
                                         x_T_mode=a.x_t, seed=a.seed, settings=settings,
                                         upsample=up)
            record.update(image=a.image, image2=a.image2, thetas=th.tolist(), x_T=a.x_t)
        else:
            th = np.linspace(0.0, a.max_theta, a.steps)
            out = manipulate.text_diff(pipe, images["image"], a.caption_from, a.caption_to, th,
                                       seed=a.seed, settings=settings, upsample=up)
            record.update(image=a.image, caption_from=a.caption_from, caption_to=a.caption_to,
                          thetas=th.tolist())
        save_grid(out, os.path.join(a.out, "strip.png"), cols=len(out))
        record["files"] = ["strip.png"]
    paths.write_text(os.path.join(a.out, "settings.json"), json.dumps(record, indent=2))
    return {"images": np.asarray(out), "record": record}


def main(argv):
    command = argv[1] if len(argv) > 1 else "text"
    if len(argv) > 2 or command not in COMMANDS:
        raise app.UsageError(f"expected one command of {', '.join(COMMANDS)}, got "
                             f"{' '.join(argv[1:])}")
    from unclip_jax import console
    console.quiet_terminal()  # Orbax logs every restore at INFO
    try:
        res = sample(command, FLAGS)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(res['record']['files'])} file(s) to {res['record']['out']} ({command})")


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    define_flags(FLAGS)
    from unclip_jax import console
    console.run_app(main)
