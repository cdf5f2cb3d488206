"""Sample from trained checkpoints: text -> image, and the paper's image manipulations.

  python -m unclip_jax.sample --workdir=runs/shapes --prompt "a red circle" --num 4 --out out/
  python -m unclip_jax.sample --workdir=runs/shapes --prompts-file prompts.txt --prior ar ...
  python -m unclip_jax.sample variations  --workdir=W --image in.png --num 4 --eta 1.0 --out out/
  python -m unclip_jax.sample interpolate --workdir=W --image a.png --image2 b.png --steps 5 --out out/
  python -m unclip_jax.sample textdiff    --workdir=W --image in.png --from "a red circle" \
                                          --to "a blue circle" --steps 5 --out out/

Writes PNGs (one per image, or a strip for manipulations) and settings.json into --out; the
workdir is only read (EMA weights by default). Errors in the input are reported in one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: XLA:CPU flags and the allocator


import numpy as np

from unclip_jax.images import read_image, write_image


def _settings_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling settings")
    g.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion")
    g.add_argument("--prior-steps", default="64")
    g.add_argument("--prior-method", choices=("ddpm", "ddim"), default="ddpm")
    g.add_argument("--prior-guidance", type=float, default=1.0)
    g.add_argument("--best-of", type=int, default=2, help="diffusion prior candidates (paper: 2)")
    g.add_argument("--ar-temperature", type=float, default=1.0)
    g.add_argument("--ar-top-k", type=int, default=0)
    g.add_argument("--decoder-steps", default="50")
    g.add_argument("--decoder-sampler", choices=("ddpm", "ddim"), default="ddpm")
    g.add_argument("--decoder-eta", type=float, default=0.0)
    g.add_argument("--decoder-guidance", type=float, default=3.0)
    g.add_argument("--upsampler-steps", default="ddim15")
    g.add_argument("--upsampler-eta", type=float, default=0.0)


def _settings(a):
    from unclip_jax.inference import SampleSettings
    return SampleSettings(
        prior=a.prior, prior_steps=a.prior_steps, prior_method=a.prior_method,
        prior_guidance=a.prior_guidance, num_candidates=a.best_of,
        ar_temperature=a.ar_temperature, ar_top_k=a.ar_top_k, decoder_steps=a.decoder_steps,
        decoder_method=a.decoder_sampler, decoder_eta=a.decoder_eta,
        decoder_guidance=a.decoder_guidance, upsampler_steps=a.upsampler_steps,
        upsampler_eta=a.upsampler_eta)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unclip_jax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", required=True, help="the main job's workdir")
    common.add_argument("--out", required=True, help="output directory (created)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--raw", action="store_true", help="use raw weights instead of the EMA")
    common.add_argument("--no-upsample", action="store_true",
                        help="manipulations: stop at the decoder's resolution")
    _settings_args(common)
    g = sub.add_parser("generate", parents=[common], help="text -> image (the default)")
    g.add_argument("--prompt", action="append", default=[])
    g.add_argument("--prompts-file")
    g.add_argument("--num", type=int, default=1, help="images per prompt")
    v = sub.add_parser("variations", parents=[common])
    v.add_argument("--image", required=True)
    v.add_argument("--num", type=int, default=4)
    v.add_argument("--eta", type=float, default=1.0)
    i = sub.add_parser("interpolate", parents=[common])
    i.add_argument("--image", required=True)
    i.add_argument("--image2", required=True)
    i.add_argument("--steps", type=int, default=5)
    i.add_argument("--x-t", choices=("fixed", "slerp"), default="fixed")
    t = sub.add_parser("textdiff", parents=[common])
    t.add_argument("--image", required=True)
    t.add_argument("--from", dest="caption_from", required=True)
    t.add_argument("--to", dest="caption_to", required=True)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--max-theta", type=float, default=0.5)
    return p


def _prompts(a) -> list[str]:
    prompts = list(a.prompt)
    if a.prompts_file:
        if not os.path.isfile(a.prompts_file):
            raise FileNotFoundError(f"prompts file {a.prompts_file} does not exist")
        with open(a.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    for k, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {k} is empty")
    return prompts


def run(argv: list[str]) -> dict:
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["generate"] + argv
    a = parser().parse_args(argv)
    from unclip_jax import manipulate
    from unclip_jax.inference import Pipeline
    from unclip_jax.images import save_grid

    settings = _settings(a)
    # Inputs are checked before the (slow) model loading.
    prompts = _prompts(a) if a.command == "generate" else None
    images = {k: read_image(getattr(a, k)) for k in ("image", "image2")
              if getattr(a, k, None)}
    pipe = Pipeline.from_workdir(a.workdir, ema=not a.raw)
    os.makedirs(a.out, exist_ok=True)
    up = not a.no_upsample
    record = {"command": a.command, "workdir": os.path.abspath(a.workdir), "seed": a.seed,
              "out": os.path.abspath(a.out),
              "ema": not a.raw, **dataclasses.asdict(settings)}
    if a.command == "generate":
        rows = [p for p in prompts for _ in range(a.num)]
        out = pipe.text_to_image(rows, seed=a.seed, settings=settings)["images"]
        files = []
        for k, (p, img) in enumerate(zip(rows, out)):
            name = f"{k:04d}.png"
            write_image(img, os.path.join(a.out, name))
            files.append({"file": name, "prompt": p})
        record.update(prompts=prompts, num=a.num, files=files)
    else:
        if a.command == "variations":
            out = manipulate.variations(pipe, images["image"], num=a.num, eta=a.eta, seed=a.seed,
                                        settings=settings, upsample=up)
            record.update(image=a.image, num=a.num, eta=a.eta)
        elif a.command == "interpolate":
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
    with open(os.path.join(a.out, "settings.json"), "w") as f:
        json.dump(record, f, indent=2)
    return {"images": np.asarray(out), "record": record}


def main():
    try:
        res = run(sys.argv[1:])
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(res['record']['files'])} file(s) to {res['record'].get('out', '')}"
          .rstrip() + f" ({res['record']['command']})")


if __name__ == "__main__":
    main()
