"""The web-data recipe of the whole-stack runner (recipes/runner.py): a pretrained CLIP imported
from a Hugging Face folder and real captioned images (experiments/webdata.py). The workdir, the
data and the HF folder may each be local or on object storage (gs://...).

What differs from the shapes recipe, as the runner's hooks:
  prepare      the `:smoke` variant's inputs (webdataset shards and a tiny random HF CLIP under
               <workdir>/inputs, made once, on a gs:// workdir there too) and their paths
  check        the HF folder is a CLIP, the data has captions, a workdir already linked to
               another CLIP is refused: before anything is written
  adapt_stage  the stages' sizes that follow the CLIP: embed_dim / clip_dim = projection_dim,
               text_ctx and the token encodings' width from its text model, the decoder's
               caption vocabulary and pad id from its tokenizer
  STEPS        "clip": link <workdir>/clip to the HF folder (clip/hf_clip.json, see
               models/clip_import.py), nothing trained; "evaluate": unclip_jax.evaluate on the
               held-out split (CLIP score with the same CLIP, prior cosines, CLIP FD,
               precision/recall; FID and KID when config.evaluate.inception_weights is set)
               into <workdir>/eval/<config.evaluate.name>/
"""
from __future__ import annotations

import functools
import os
import time

from unclip_jax.console import say
from unclip_jax.models import clip_import

# The default CLIP's sizes (openai/clip-vit-large-patch14), used only when the config names no
# folder yet (checking a config without the weights at hand).
VIT_L14 = dict(embed_dim=768, text_width=768, text_ctx=77, vocab_size=49408, pad_id=49407,
               image_size=224)


def _hf_dir(config) -> str:
    from unclip_jax import paths
    return str(paths.path(str(config.clip_import.hf_dir))) if config.clip_import.hf_dir else ""


@functools.lru_cache(maxsize=4)
def _spec(hf_dir: str) -> dict:
    from unclip_jax.data.tokenizer import Tokenizer
    stage = clip_import.clip_stage_config(hf_dir)
    tok = Tokenizer.from_hf(hf_dir, context_length=int(stage.model.text_ctx))
    m = stage.model
    return dict(embed_dim=int(m.embed_dim), text_width=int(m.text_width),
                text_ctx=int(m.text_ctx), vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                image_size=int(m.image_size))


def clip_spec(config) -> dict:
    """The sizes of the configured CLIP (VIT_L14 while no folder is named or present)."""
    from unclip_jax import paths
    d = _hf_dir(config)
    return _spec(d) if d and paths.path(d).is_dir() else dict(VIT_L14)


# ----------------------------------------------------------------------------------- hooks
def prepare(config, workdir: str):
    """Smoke runs (config.make_inputs): shards and a random HF CLIP under <workdir>/inputs
    (local or gs://, each written once for all processes)."""
    if not bool(config.make_inputs):
        return config
    from unclip_jax import paths
    from unclip_jax.stages.smoke import write_inputs
    m = config.make_inputs_sizes
    pattern, hf = write_inputs(
        os.path.join(str(paths.path(workdir)), "inputs"), shard_size=int(m.shard_size),
        splits={"train": int(m.num_train), "test": int(m.num_test)},
        image_size=int(m.image_size), clip=m.clip.to_dict())
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.path = pattern
        config.clip_import.hf_dir = hf
    return config


def _check_captions(config, split: str, n: int = 8):
    """Open the split and read its first examples: none with a caption is an error naming the
    data and the caption field it reads, rather than a stage that finds no examples."""
    from unclip_jax.data import sources
    d = config.data
    src = sources.open_source(d, split, 0, 1)
    records = [src[i] for i in range(min(n, len(src)))]
    if any(r.get("caption") for r in records):
        return
    field = {"webdataset": "KEY.txt or the 'caption' field of KEY.json",
             "folder": "the 'caption' field of captions.jsonl",
             "tfds": f"feature {d.get('caption_key')!r}"}.get(d.name, "caption")
    where = getattr(src, "shards", [src.path])[0]
    raise ValueError(f"data split {split!r} ({where}): none of its first {len(records)} examples "
                     f"has a caption ({field} is missing or empty)")


def check(config, workdir: str, cfgs: dict):
    from unclip_jax import paths
    hf = _hf_dir(config)
    if not hf:
        raise ValueError("config.clip_import.hf_dir is empty: name a Hugging Face CLIP folder "
                         "(config.json, model.safetensors, tokenizer files; local or gs://)")
    clip_import.check_hf_clip_dir(hf)
    linked = clip_import.linked_hf_dir(os.path.join(workdir, "clip"))
    if linked is not None and str(paths.path(linked)) != hf:
        raise ValueError(f"{workdir}/clip/hf_clip.json imports {linked}, but "
                         f"config.clip_import.hf_dir is {hf}: this run's cache and stages were "
                         "made with that CLIP; use a new workdir for another")
    splits = ["train"] + ([str(config.evaluate.protocol.split)]
                          if "evaluate" in config.order else [])
    for split in dict.fromkeys(splits):
        _check_captions(config, split)


def adapt_stage(name: str, c, config):
    s = clip_spec(config)
    e, ctx, width = s["embed_dim"], s["text_ctx"], s["text_width"]
    if name in ("diffusion_prior", "ar_prior"):
        c.model.update(embed_dim=e, text_ctx=ctx, text_dim=width, vocab_size=0)
        if name == "diffusion_prior":
            c.model.scale = float(e) ** 0.5   # unit z -> per-dim std ~1
        else:
            c.model.pca_components = min(int(c.model.pca_components), e)
    elif name == "decoder":
        c.model.update(clip_dim=e, image_emb_scale=float(e) ** 0.5, text_vocab=s["vocab_size"],
                       text_ctx=ctx, text_pad_id=s["pad_id"], image_emb_source="cache",
                       tokens_source="cache")


def tokenizer_dir(config, workdir: str) -> str:
    return _hf_dir(config)


def embed_data(config):
    from unclip_jax.recipes.runner import source_data
    return source_data(config, clip_spec(config)["image_size"])


def _import_clip(run):
    stage = os.path.join(run.workdir, "clip")
    clip_import.link_clip_stage(stage, _hf_dir(run.config))
    say(f"[clip] {stage} imports {_hf_dir(run.config)} (nothing trained)")


def _evaluate(run):
    from unclip_jax import paths
    from unclip_jax.eval.evaluator import default_out, evaluate
    e = run.config.evaluate.copy_and_resolve_references()
    with e.unlocked():
        if e.data is None:
            e.data = run.config.data.copy_and_resolve_references()
        for k, v in run.config.sample.settings.items():
            if k not in e.sampling:
                e.sampling[k] = v
    out = default_out(e, str(paths.path(run.workdir)))
    if (paths.path(out) / "eval.json").exists():
        say(f"[evaluate] {out}/eval.json exists: skipped")
        return
    t = time.perf_counter()
    res = evaluate(e, run.workdir, out, log=lambda s: None)
    run.timings["evaluate"] = time.perf_counter() - t
    if "metrics" in res:
        m = res["metrics"]
        say(f"[evaluate] {res['num_samples']} held-out captions: " + ", ".join(
            f"{k} {m[k]:.4g}" for k in ("clip_score", "clip_score_real", "fid", "kid_mean")
            if k in m) + "".join(f"; {k} prior cos {p['cos_sample_true']:.3f} (z_t "
                                 f"{p['cos_text_true']:.3f})" for k, p in res["prior"].items())
            + f"; {out}/eval.json")

STEPS = {"clip": _import_clip, "evaluate": _evaluate}
