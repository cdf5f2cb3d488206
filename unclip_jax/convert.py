"""Convert released weights into an unclip-jax workdir: `karlo` (kakaobrain/karlo-v1-alpha).

  python -m unclip_jax.convert karlo --src=DIR --out=WORKDIR [--dtype=bfloat16]
      [--image_encoder=VDIR]

DIR is a local copy of Karlo in diffusers' UnCLIPPipeline layout (download it yourself, e.g.
`huggingface-cli download kakaobrain/karlo-v1-alpha --local-dir DIR`); nothing is fetched here.
WORKDIR receives prior/, decoder/ (with the text projection), super_res_first/, super_res_last/
and text_encoder/ as Orbax checkpoints of our models' params (float32 or bfloat16; --dtype, also
recorded in karlo.json and manifest.json), tokenizer/,
prior_stats.npz (the prior's clip_mean / clip_std), karlo.json (the source configs, from which
the models are rebuilt, the scheduler settings and Karlo's sampling preset) and manifest.json
(the source and every converted tensor's name and shape). With a CLIP vision tower,
image_encoder/ too, which image variations, interpolations, text diffs and evaluation need:
VDIR is Karlo's image-variations release (kakaobrain/karlo-v1-alpha-image-variations, whose
image_encoder/ is the ViT-L/14 matching Karlo's text encoder), a CLIPVisionModelWithProjection
folder or a Hugging Face CLIPModel folder; without --image_encoder, DIR/image_encoder/ is used
when present. Input that is not Karlo's layout (a
missing component, an unknown block type, a tensor of the wrong shape) is reported in one line
naming the folder or tensor, and WORKDIR is not created: the conversion is written to a
temporary folder beside it and renamed at the end. WORKDIR may be a gs:// URL (an object store
has no rename: its files are written in place, karlo.json last, and removed again on a failure;
every input is checked before the first is written).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from absl import app, flags

COMMANDS = ("karlo",)
CHECKPOINTED = ("prior", "decoder", "super_res_first", "super_res_last", "text_encoder")
IMAGE_ENCODER = "image_encoder"   # checkpointed too when a vision tower is converted
WORKDIR_FILE = "karlo.json"
# Karlo's defaults (diffusers' UnCLIPPipeline.__call__): prior 25 steps at guidance 4, decoder
# 25 at guidance 8, super-resolution 7 (super_res_first for all but the last step).
PRESET = {"prior_steps": 25, "prior_guidance": 4.0, "decoder_steps": 25,
          "decoder_guidance": 8.0, "super_res_steps": 7}


def define_flags(fv: flags.FlagValues) -> None:
    f = dict(flag_values=fv)
    flags.DEFINE_string("src", None, "The diffusers-layout folder to convert (a local path, or "
                        "a gs:// URL read from a local copy).", **f)
    flags.DEFINE_string("out", None, "The workdir to write (must not exist; a local path or a "
                        "gs:// URL).", **f)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored weights' dtype.", **f)
    flags.DEFINE_string("image_encoder", None, "The CLIP vision tower to convert (for variations "
                        "and evaluation): karlo-v1-alpha-image-variations, a "
                        "CLIPVisionModelWithProjection or a HF CLIPModel folder (local or gs://). "
                        "Default: --src's image_encoder/ when present.", **f)


def _save_params(path: str, params) -> None:
    import orbax.checkpoint as ocp

    from unclip_jax import paths
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(paths.path(path), params)
    ckpt.wait_until_finished()


def convert_karlo(src: str, out: str, dtype: str = "float32",
                  image_encoder: str | None = None) -> dict:
    """Convert the Karlo folder `src` into the new workdir `out`; returns the manifest.
    `image_encoder`: the folder of the CLIP vision tower (see the module docstring); None:
    `src`/image_encoder when present."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unclip_jax.models import karlo_import as ki

    from unclip_jax import paths

    out = str(paths.path(out)).rstrip("/")
    paths.refresh(out)
    if paths.path(out).exists():
        raise FileExistsError(f"convert: --out {out!r} exists; give a new workdir")
    paths.check_bucket(out)   # before the conversion, not after it
    # A gs:// (object store) folder is read from a local copy; the manifest names the URL.
    mirrors = {}   # local copy -> its URL

    def local(p: str) -> str:
        if not paths.is_url(p):
            return os.path.abspath(p)
        d = paths.local_dir(p, recursive=True)
        mirrors[d] = p.rstrip("/")
        return d

    def named(p: str) -> str:
        p = os.path.abspath(p)
        for d, url in mirrors.items():
            if p == d or p.startswith(d + os.sep):
                return url + p[len(d):].replace(os.sep, "/")
        return p

    src = local(src)
    if image_encoder is not None:
        image_encoder = local(image_encoder)
    comps = ki.read_pipeline(src)   # every folder and config checked before anything converts
    if image_encoder is None and os.path.isdir(os.path.join(src, IMAGE_ENCODER)):
        image_encoder = src
    vision = ki.read_image_encoder(image_encoder) if image_encoder else None
    store = jnp.dtype(dtype)
    converted, manifest = {}, {"source": named(src), "dtype": dtype, "tensors": {}}
    _, converted["prior"], scaling, manifest["tensors"]["prior"] = ki.convert_prior(
        comps["prior"])
    _, converted["decoder"], man = ki.convert_decoder(comps["decoder"], comps["text_proj"])
    manifest["tensors"]["decoder+text_proj"] = man
    for name in ("super_res_first", "super_res_last"):
        _, converted[name], manifest["tensors"][name] = ki.convert_upsampler(comps[name], name)
    _, converted["text_encoder"], manifest["tensors"]["text_encoder"] = \
        ki.convert_text_encoder(comps["text_encoder"])
    if vision is not None:
        _, converted[IMAGE_ENCODER], manifest["tensors"][IMAGE_ENCODER] = \
            ki.convert_image_encoder(vision, comps["text_encoder"]["config"])
        manifest["image_encoder_source"] = named(vision["dir"])
    schedulers = {name: ki.scheduler_settings(comps[f"{name}_scheduler"]["config"],
                                              f"{name}_scheduler")
                  for name in ("prior", "decoder", "super_res")}
    from unclip_jax.data.tokenizer import Tokenizer
    Tokenizer.from_hf(comps["tokenizer"]["dir"])   # fails here, not at sampling time

    configs = {n: comps[n]["config"] for n in ("prior", "text_proj", "decoder",
                                               "super_res_first", "super_res_last",
                                               "text_encoder")}
    if vision is not None:
        configs[IMAGE_ENCODER] = vision["config"]
    meta = {"kind": "karlo", "source": manifest["source"], "dtype": dtype,
            "image_encoder_source": manifest.get("image_encoder_source"),
            "configs": configs, "schedulers": schedulers, "preset": PRESET}

    def write(dst: str) -> None:
        """The workdir's files into `dst` (local or a URL), karlo.json (what makes it a Karlo
        workdir to the readers) last."""
        for name in converted:
            params = jax.tree.map(lambda a: jnp.asarray(a, store), converted[name])
            _save_params(f"{dst}/{name}", params)
        paths.save_npz(f"{dst}/prior_stats.npz",
                       image_mean=np.asarray(scaling.image_mean, np.float32),
                       image_std=np.asarray(scaling.image_std, np.float32))
        if paths.is_url(dst):
            paths.upload(comps["tokenizer"]["dir"], f"{dst}/tokenizer")
        else:
            shutil.copytree(comps["tokenizer"]["dir"], os.path.join(dst, "tokenizer"))
        paths.write_text(f"{dst}/manifest.json", json.dumps(manifest, indent=1))
        paths.write_text(f"{dst}/{WORKDIR_FILE}", json.dumps(meta, indent=1))

    if paths.is_url(out):
        # An object store renames no directory: the files go to `out` itself, and a failure
        # removes them (`out` did not exist before); readers see a Karlo workdir only once
        # karlo.json, the last file, is there.
        try:
            write(out)
        except BaseException:
            paths.remove_tree(out)
            raise
        return manifest
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        write(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv):
    command = argv[1] if len(argv) > 1 else None
    if len(argv) != 2 or command not in COMMANDS:
        raise app.UsageError(f"expected one command of {', '.join(COMMANDS)}, got "
                             f"{' '.join(argv[1:]) or 'none'}")
    fv = flags.FLAGS
    if not fv.src or not fv.out:
        raise app.UsageError("--src and --out are required")
    from unclip_jax import console
    console.quiet_terminal()
    from unclip_jax.models.karlo_import import KarloFormatError
    try:
        manifest = convert_karlo(fv.src, fv.out, fv.dtype, fv.image_encoder)
    except (KarloFormatError, FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    n = sum(len(v) for v in manifest["tensors"].values())
    vision = (f", image encoder from {manifest['image_encoder_source']}"
              if "image_encoder_source" in manifest else
              "; no image encoder (variations and evaluation need --image_encoder)")
    print(f"wrote {fv.out}: {n} tensors from {fv.src} ({fv.dtype}){vision}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    from unclip_jax import console
    console.run_app(main)
