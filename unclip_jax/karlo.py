"""Sample from a converted Karlo workdir (`python -m unclip_jax.convert karlo`): text -> image,
and the image manipulations and evaluation through the `inference.Pipeline` interface.

    pipe = KarloPipeline.from_workdir(WORKDIR)                # Pipeline.from_workdir does this too
    out = pipe.text_to_image(["a red frog on a leaf"], seed=0)   # settings default to PRESET
    out["images"]            # [B, 256, 256, 3] in [-1, 1]; also decoder_images (64px),
                             # image_embedding (the prior's z_i), text_embedding
    manipulate.variations(pipe, image)     # needs the vision tower (convert --image_encoder)

Karlo's path as diffusers' UnCLIPPipeline runs it: the CLIP text encoder (ViT-L/14) gives the
projected text embedding and the hidden states; the prior samples z_i with x0 clipped to +-5
and guidance against the encoding of "" (not a learned null); the decoder (learned-range
variance) is guided against the learned null z_i plus the "" encoding; the 64px image, clamped,
is resized (antialiased bicubic) and super-resolved with `super_res_first` for all steps but
the last, which uses `super_res_last`. Each stage is one `lax.scan` (ancestral DDPM over
Karlo's step spacing), and the whole path is one jitted program per batch size. With a `mesh`
the batch is split over its devices, and the weights are replicated, or with `fsdp=True` split
over the devices too (`param_shardings`), for weights that do not fit one device.

Embeddings are Karlo's: CLIP's projected, unnormalised features (what its prior makes and its
decoder takes), z_i of an image from the vision tower converted with `--image_encoder`
(diffusers' UnCLIPImageVariationPipeline `image_embeds`). The manipulations decode with the
caption "" (as Karlo's image-variations pipeline) from the decoder's DDIM inversion.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import diffusion, parallel
from unclip_jax.models.prior import EmbeddingScaling

WORKDIR_FILE = "karlo.json"
# Compiled text -> image programs, shared by every KarloPipeline of the same architecture: the
# program depends on the configs, dtype, settings and batch only (weights and the prior's CLIP
# statistics are arguments), so reloading a workdir does not recompile.
_COMPILED: dict = {}
# Karlo's defaults (diffusers' UnCLIPPipeline.__call__) as `inference.SampleSettings` fields:
# prior 25 steps at guidance 4, decoder 25 at guidance 8, super-resolution 7, all with its
# scheduler's spacing ("karloN"); no best-of-N. (A dict: this module is imported by
# inference.Pipeline.from_workdir, so it does not import inference.)
PRESET = dict(prior_steps="karlo25", prior_guidance=4.0, num_candidates=1,
              decoder_steps="karlo25", decoder_guidance=8.0, upsampler_steps="karlo7")
_USED = ("prior_steps", "prior_guidance", "decoder_steps", "decoder_guidance", "upsampler_steps")


def is_karlo_workdir(workdir: str) -> bool:
    from unclip_jax import paths
    return (paths.path(workdir) / WORKDIR_FILE).exists()


def _restore(path: str, dtype=jnp.float32):
    """Params as stored (float32 or bfloat16), cast to the pipeline's compute dtype: float32
    weights for float32 arithmetic, bfloat16 ones (half the memory) for bfloat16."""
    import orbax.checkpoint as ocp

    from unclip_jax import paths
    if not paths.path(path).is_dir():
        raise FileNotFoundError(f"karlo workdir: {path} is missing")
    params = ocp.StandardCheckpointer().restore(paths.path(path))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


class _Program:
    """The models (no weights) and schedules of one architecture, and its pure functions of
    (params, arrays, settings): what a compiled program depends on."""

    def __init__(self, cfg: dict, schedulers: dict, dtype):
        from unclip_jax.models import karlo_import as ki

        self.prior = ki.prior_model(cfg["prior"], dtype)
        self.decoder = ki.decoder_model(cfg["decoder"], cfg["text_proj"], dtype)
        self.super_res = ki.upsampler_model(cfg["super_res_first"], "super_res_first", dtype)
        last = ki.upsampler_model(cfg["super_res_last"], "super_res_last", dtype)
        if last.unet != self.super_res.unet:
            raise ValueError("karlo workdir: super_res_first and super_res_last differ in "
                             "architecture; one model definition serves both")
        self.has_vision = "image_encoder" in cfg
        self.clip = ki.text_encoder_model(cfg["text_encoder"], dtype, cfg.get("image_encoder"))
        self.schedulers = schedulers
        self.image_size = int(cfg["decoder"]["sample_size"])
        self.out_size = int(cfg["super_res_first"]["sample_size"])

    # -- pieces --------------------------------------------------------------------------
    def _schedule(self, which: str, steps: str):
        s = self.schedulers[which]
        return diffusion.respace(diffusion.make_schedule(s["schedule"], s["num_timesteps"]),
                                 steps)

    def _sample_kw(self, which: str) -> dict:
        s = self.schedulers[which]
        return dict(method="ddpm", var_type=s["var_type"], parameterization=s["parameterization"],
                    clip_x0=s["clip_x0"])

    def encode_text(self, params, tokens, mask) -> dict:
        """Karlo's text conditioning: the projected (unnormalised) embedding z_t, the hidden
        states and the token mask."""
        from unclip_jax.models.clip import CLIP
        out = self.clip.apply({"params": params["text_encoder"]}, tokens,
                              method=CLIP.encode_text)
        return {"emb": out["features"], "states": out["token_encodings"], "mask": mask}

    def encode_image(self, params, images):
        """Karlo's z_i of images [B, H, W, 3] in [-1, 1]: the vision tower's projected,
        unnormalised embedding (diffusers' `image_embeds`), after a bicubic resize to its size
        (as CLIPImageProcessor resizes)."""
        from unclip_jax.models.clip import CLIP
        size = int(self.clip.vision["image_size"])
        if images.shape[1:3] != (size, size):
            images = jax.image.resize(images, (images.shape[0], size, size, 3), "bicubic")
        clip_params = {**params["text_encoder"], **params["image_encoder"]}
        return self.clip.apply({"params": clip_params}, images,
                               method=CLIP.encode_image)["features"]

    def prior_fn(self, params, text, null, rng, s):
        """z_i for the text (guided against the "" encoding `null`, as Karlo)."""
        def prior_fn(x, t, c):
            return self.prior.apply({"params": params["prior"]}, x, t, c)
        cond = {"z_t": text["emb"], "token_embeddings": text["states"],
                "token_mask": text["mask"]}
        uncond = {"z_t": null["emb"], "token_embeddings": null["states"],
                  "token_mask": null["mask"]}
        x = diffusion.sample(prior_fn, self._schedule("prior", s.prior_steps),
                             (text["emb"].shape[0], self.prior.embed_dim), rng, cond,
                             uncond=uncond, guidance_scale=s.prior_guidance,
                             **self._sample_kw("prior"))
        return EmbeddingScaling(**params["prior_stats"]).image_inverse(x)

    def _decoder(self, params, z_i, text, null):
        def dec_fn(x, t, c):
            return self.decoder.apply({"params": params["decoder"]}, x, t, c["z"],
                                      token_mask=c["mask"], text_emb=c["emb"],
                                      text_states=c["states"], drop_image_emb=c["drop"])
        b = z_i.shape[0]
        cond = dict(text, z=z_i, drop=jnp.zeros((b,), bool))
        # Unconditional: the learned null z_i and the "" caption.
        uncond = dict(null, z=z_i, drop=jnp.ones((b,), bool))
        return dec_fn, cond, uncond

    def decode_fn(self, params, z_i, text, null, rng, s, x_T=None):
        """Decoder images for z_i: Karlo's ancestral sampler (learned-range variance), or DDIM
        with `s.decoder_method == "ddim"` (eta `s.decoder_eta`; what the manipulations use from
        an inverted x_T). `s.decoder_clip` False: no x0 clipping (as the inversion has none)."""
        dec_fn, cond, uncond = self._decoder(params, z_i, text, null)
        kw = self._sample_kw("decoder")
        method = getattr(s, "decoder_method", "ddpm")
        if not getattr(s, "decoder_clip", True):
            kw["clip_x0"] = None
        if method == "ddim":
            kw.update(method="ddim", eta=s.decoder_eta,
                      learned_sigma=kw["var_type"] == "learned_range")
        size = self.image_size
        low = diffusion.sample(dec_fn, self._schedule("decoder", s.decoder_steps),
                               (z_i.shape[0], size, size, 3), rng, cond, uncond=uncond,
                               guidance_scale=s.decoder_guidance, x_T=x_T, **kw)
        return low

    def invert_fn(self, params, images, z_i, text, null, s):
        """DDIM inversion with the decoder (conditioned as `decode_fn`): images -> x_T."""
        dec_fn, cond, uncond = self._decoder(params, z_i, text, null)
        kw = self._sample_kw("decoder")
        return diffusion.ddim_invert(dec_fn, self._schedule("decoder", s.decoder_steps), images,
                                     cond, uncond=uncond, guidance_scale=s.decoder_guidance,
                                     parameterization=kw["parameterization"],
                                     learned_sigma=kw["var_type"] == "learned_range")

    def super_res_fn(self, params, low, rng, s):
        """The decoder's images (clamped) -> the super-resolved ones: `super_res_first` for all
        steps but the last, `super_res_last` for it."""
        low = jnp.clip(low, -1.0, 1.0)
        sr_sched = self._schedule("super_res", s.upsampler_steps)
        last_t = sr_sched.timestep_map[0]

        def sr_fn(x, t, c):
            def run(p):
                return self.super_res.apply({"params": p}, x, t, c).astype(jnp.float32)
            # The last step (the smallest timestep) is super_res_last's (Karlo's improved SR).
            return jax.lax.cond(t[0] == last_t, lambda: run(params["super_res_last"]),
                                lambda: run(params["super_res_first"]))
        o = self.out_size
        images = diffusion.sample(sr_fn, sr_sched, (low.shape[0], o, o, 3), rng, low,
                                  **self._sample_kw("super_res"))
        return jnp.clip(images, -1.0, 1.0)

    def text_to_image_fn(self, params, tokens, mask, null_tokens, null_mask, rng, s):
        """s: the settings' fields of _USED (a namespace)."""
        text = self.encode_text(params, tokens, mask)
        null = self.encode_text(params, null_tokens, null_mask)
        r_prior, r_dec, r_sr = jax.random.split(rng, 3)
        z_i = self.prior_fn(params, text, null, r_prior, s)
        low = jnp.clip(self.decode_fn(params, z_i, text, null, r_dec, s), -1.0, 1.0)
        images = self.super_res_fn(params, low, r_sr, s)
        return {"images": images, "decoder_images": low, "image_embedding": z_i,
                "text_embedding": text["emb"]}


def _stage(workdir: str, name: str, model: dict):
    """A converted component as the stage record tools read from a run (`Trained`: its config's
    model sizes, step 0 = the released weights, its directory); the weights live in
    KarloPipeline.params."""
    import ml_collections

    from unclip_jax.train.checkpoint import Trained
    cfg = ml_collections.ConfigDict({"stage": name, "data": None, "model": model})
    return Trained(cfg, None, None, None, 0, os.path.join(workdir, name))


class KarloPipeline:
    """The converted Karlo weights, tokenizer and the compiled text -> image path, plus the
    `inference.Pipeline` methods the manipulations (unclip_jax.manipulate) and the evaluator
    use: encode_text, encode_images, sample_prior, decode, invert, upsample. Its embeddings are
    Karlo's: CLIP's projected, unnormalised features (what its prior makes and its decoder
    takes). Images need the vision tower (`convert --image_encoder`)."""

    def __init__(self, workdir: str, dtype=jnp.float32, mesh=None, fsdp: bool = False):
        from unclip_jax import paths
        from unclip_jax.data.tokenizer import Tokenizer

        meta = json.loads((paths.path(workdir) / WORKDIR_FILE).read_text())
        self.meta, self.workdir = meta, workdir
        self.program = _Program(meta["configs"], meta["schedulers"], dtype)
        names = ["prior", "decoder", "super_res_first", "super_res_last", "text_encoder"]
        if self.program.has_vision:
            names.append("image_encoder")
        self.params = {n: _restore(os.path.join(workdir, n), dtype) for n in names}
        with paths.np_load(os.path.join(workdir, "prior_stats.npz")) as s:
            self.params["prior_stats"] = {k: jnp.asarray(s[k]) for k in ("image_mean",
                                                                        "image_std")}
        self.tokenizer = Tokenizer.from_hf(os.path.join(workdir, "tokenizer"),
                                           context_length=self.program.prior.text_ctx)
        self._arch = (json.dumps([meta["configs"], meta["schedulers"]], sort_keys=True),
                      jnp.dtype(dtype).name)
        self._compiled: dict = {}
        # Stage records (what evaluate reads of a run): the released weights are step 0.
        p = self.program
        self.clip = _stage(workdir, "text_encoder", {"image_size": int(p.clip.vision[
            "image_size"]), "embed_dim": p.clip.embed_dim})
        self.prior = _stage(workdir, "prior", {"embed_dim": p.prior.embed_dim})
        self.ar_prior = None
        self.decoder = _stage(workdir, "decoder", {"image_size": p.image_size})
        self.upsamplers = (_stage(workdir, "super_res_first", {
            "image_size": p.out_size, "low_res_size": p.image_size}),)
        self.mesh = mesh
        if mesh is not None:
            self.params = jax.device_put(self.params, param_shardings(self.params, mesh, fsdp))

    @classmethod
    def from_workdir(cls, workdir: str, *, dtype=jnp.float32, mesh=None, fsdp: bool = False,
                     **_) -> "KarloPipeline":
        """`fsdp`: with a mesh, split each large weight over its devices (`param_shardings`)
        instead of replicating it."""
        if not is_karlo_workdir(workdir):
            raise FileNotFoundError(f"{workdir} is not a converted Karlo workdir "
                                    f"({WORKDIR_FILE} missing)")
        return cls(workdir, dtype, mesh, fsdp)

    def _empty_prompt(self, n: int):
        """The tokens of "" (bos, eos, padding), Karlo's unconditional caption."""
        t = self.tokenizer
        tokens = np.full((n, t.context_length), t.pad_id, np.int32)
        tokens[:, 0], tokens[:, 1] = t.bos_id, t.eos_id
        mask = np.zeros_like(tokens, bool)
        mask[:, :2] = True
        return tokens, mask

    @property
    def upsampler_dirs(self) -> list[str]:
        """The super-resolution stages' directories (as Pipeline.upsampler_dirs)."""
        return [os.path.join(self.workdir, n) for n in ("super_res_first", "super_res_last")]

    # -- batches ----------------------------------------------------------------------------
    def _rows(self, *arrays):
        return parallel.shard_rows(self.mesh, *arrays)

    def _jit(self, key, fn):
        if key not in self._compiled:
            self._compiled[key] = jax.jit(fn)
        return self._compiled[key]

    def tokenize(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not len(prompts):
            raise ValueError("no prompts given")
        return self.tokenizer.encode(list(prompts))

    def _text_rows(self, prompts, n: int):
        """(tokens, mask) of the prompts, or of "" for each of n rows when prompts is None."""
        if prompts is None:
            return self._empty_prompt(n)
        tokens, mask = self.tokenize(prompts)
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} prompts for {n} image embeddings")
        return tokens, mask

    # -- text -> image --------------------------------------------------------------------------
    def text_to_image(self, prompts, *, seed: int = 0, settings=None) -> dict:
        """Images for the prompts: {"images" (256px), "decoder_images" (64px), "image_embedding",
        "text_embedding"}, numpy arrays with one row per prompt. `settings`: an
        `inference.SampleSettings` (its steps and guidance are used), None for PRESET."""
        for f in ("prior_method", "decoder_method"):
            if getattr(settings, f, "ddpm") != "ddpm":
                raise ValueError(f"karlo: {f}={getattr(settings, f)!r}; Karlo's schedulers are "
                                 "ancestral (ddpm)")
        used = tuple((f, PRESET[f] if settings is None else getattr(settings, f)) for f in _USED)
        tokens, mask = self.tokenize(prompts)
        n = len(tokens)
        tokens, mask = self._rows(tokens, mask)
        null_tokens, null_mask = self._rows(*self._empty_prompt(len(tokens)))
        key = (self._arch, used, len(tokens), self._layout())
        if key not in _COMPILED:
            _COMPILED[key] = jax.jit(functools.partial(self.program.text_to_image_fn,
                                                       s=types.SimpleNamespace(**dict(used))))
        out = _COMPILED[key](self.params, tokens, mask, null_tokens, null_mask,
                             jax.random.PRNGKey(seed))
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def _layout(self):
        """The params' shardings (part of a compiled program's identity)."""
        if self.mesh is None:
            return None
        return tuple(str(x.sharding.spec) for x in jax.tree.leaves(self.params))

    # -- the pieces (inference.Pipeline's methods, for manipulate and evaluate) -----------------
    def encode_text(self, prompts) -> dict:
        """tokens, token_mask, text_embedding (Karlo's z_t: unnormalised), token_encodings."""
        tokens, mask = self.tokenize(prompts)
        n = len(tokens)

        def f(params, tokens, mask):
            return self.program.encode_text(params, tokens, mask)
        out = self._jit(("text", len(tokens)), f)(self.params, *self._rows(tokens, mask))
        return {"tokens": tokens, "token_mask": mask,
                "text_embedding": np.asarray(out["emb"])[:n],
                "token_encodings": np.asarray(out["states"])[:n]}

    def _need_vision(self):
        if not self.program.has_vision:
            raise ValueError(
                f"karlo workdir {self.workdir} has no image encoder (image_encoder/): image "
                "variations, interpolations, text diffs and evaluation embed images with CLIP's "
                "vision tower; convert again with --image_encoder=DIR (Karlo's image-variations "
                "release kakaobrain/karlo-v1-alpha-image-variations, or a Hugging Face CLIP "
                "ViT-L/14 folder)")

    def encode_images(self, images) -> np.ndarray:
        """Karlo's z_i (the vision tower's unnormalised projection) of images [B, H, W, 3] in
        [-1, 1]."""
        self._need_vision()
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
        n = len(images)
        fn = self._jit(("image", images.shape), self.program.encode_image)
        return np.asarray(fn(self.params, *self._rows(images)))[:n]

    def sample_prior(self, prompts, *, seed: int = 0, settings=None) -> np.ndarray:
        """z_i for the prompts from Karlo's prior."""
        s = _settings(settings)
        tokens, mask = self.tokenize(prompts)
        n = len(tokens)
        rows = self._rows(tokens, mask, *self._empty_prompt(n))

        def f(params, tokens, mask, null_tokens, null_mask, rng):
            p = self.program
            return p.prior_fn(params, p.encode_text(params, tokens, mask),
                              p.encode_text(params, null_tokens, null_mask), rng, s)
        key = ("prior", s.prior_steps, s.prior_guidance, len(rows[0]))
        return np.asarray(self._jit(key, f)(self.params, *rows, jax.random.PRNGKey(seed)))[:n]

    def _conditioned(self, z, prompts, extra=()):
        """The rows of decode / invert: z_i [B, D], the prompts' tokens and mask ("" when
        None), those of "" (the unconditional caption) and the `extra` per-row arrays."""
        z = np.asarray(z, np.float32)
        n = len(z)
        tokens, mask = self._text_rows(prompts, n)
        rows = self._rows(z, tokens, mask, *self._empty_prompt(n), *extra)
        return n, rows

    def decode(self, image_embedding, *, prompts=None, seed: int = 0, x_T=None,
               settings=None) -> np.ndarray:
        """Decoder images for Karlo's z_i, captioned by the prompts or, without them, by ""
        (as Karlo's image-variations pipeline). x_T fixes the starting noise."""
        s = _settings(settings)
        extra = () if x_T is None else (np.asarray(x_T, np.float32),)
        n, rows = self._conditioned(image_embedding, prompts, extra)
        p = self.program

        def f(params, z, tokens, mask, null_tokens, null_mask, rng, *x_T):
            return p.decode_fn(params, z, p.encode_text(params, tokens, mask),
                               p.encode_text(params, null_tokens, null_mask), rng, s,
                               x_T[0] if x_T else None)
        key = ("decode", s, len(rows[0]), x_T is None)
        return np.asarray(self._jit(key, f)(self.params, *rows[:5], jax.random.PRNGKey(seed),
                                            *rows[5:]))[:n]

    def invert(self, images, image_embedding, *, prompts=None, settings=None) -> np.ndarray:
        """DDIM inversion with the decoder: images (resized to its size) -> x_T."""
        s = _settings(settings)
        images = jnp.asarray(images, jnp.float32)
        size = self.program.image_size
        if images.shape[1:3] != (size, size):
            images = jax.image.resize(images, (images.shape[0], size, size, 3), "bicubic")
        n, rows = self._conditioned(image_embedding, prompts, (np.asarray(images),))
        p = self.program

        def f(params, z, tokens, mask, null_tokens, null_mask, images):
            return p.invert_fn(params, images, z, p.encode_text(params, tokens, mask),
                               p.encode_text(params, null_tokens, null_mask), s)
        key = ("invert", s, len(rows[0]))
        return np.asarray(self._jit(key, f)(self.params, *rows))[:n]

    def upsample(self, images, *, seed: int = 0, settings=None) -> np.ndarray:
        """Karlo's super-resolution of decoder images (resized to the decoder's size first)."""
        s = _settings(settings)
        images = jnp.asarray(images, jnp.float32)
        size = self.program.image_size
        if images.shape[1:3] != (size, size):
            images = jax.image.resize(images, (images.shape[0], size, size, 3), "bicubic")
        n = images.shape[0]
        key = ("up", s.upsampler_steps, n)
        fn = self._jit(key, lambda params, low, rng: self.program.super_res_fn(params, low, rng,
                                                                                 s))
        return np.asarray(fn(self.params, *self._rows(np.asarray(images)),
                             jax.random.PRNGKey(seed)))[:n]


def abstract_params(program: _Program, dtype=jnp.float32) -> dict:
    """The text -> image path's params as ShapeDtypeStructs (what KarloPipeline.params holds,
    without the image encoder), from the models' shapes alone: plans at Karlo's full
    architecture need no weights."""
    from flax import linen as nn

    from unclip_jax.models import karlo_import as ki
    p = program

    def shapes(model, *args, **kw):
        tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kw))
        return nn.meta.unbox(tree)["params"]
    d, ctx = p.prior.embed_dim, p.prior.text_ctx
    cond = {"z_t": jnp.zeros((1, d)), "token_embeddings": jnp.zeros((1, ctx, d)),
            "token_mask": jnp.ones((1, ctx), bool)}
    t = jnp.zeros((1,), jnp.int32)
    args, kw = ki.decoder_inputs(p.decoder)
    size = 8 * 2 ** (len(p.super_res.unet["channel_mult"]) - 1)
    x = jnp.zeros((1, size, size, 3))
    sr = shapes(p.super_res, x, t, x)
    clip = shapes(p.clip, jnp.zeros((1, int(p.clip.text["ctx"])), jnp.int32),
                  method=p.clip.encode_text)
    out = {"prior": shapes(p.prior, jnp.zeros((1, d)), t, cond),
           "decoder": shapes(p.decoder, *args, **kw), "super_res_first": sr,
           "super_res_last": sr,
           "text_encoder": {k: v for k, v in clip.items()
                            if k in ("text_model", "text_projection", "logit_scale")}}
    out = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), out)
    out["prior_stats"] = {k: jax.ShapeDtypeStruct((d,), jnp.float32)
                          for k in ("image_mean", "image_std")}
    return out


def param_shardings(params, mesh, fsdp: bool, min_size: int | None = None):
    """Replicated weights, or with `fsdp` each weight of at least `min_size` (FSDP_MIN_SIZE)
    elements split over all the mesh's devices along its largest dimension they divide (XLA
    gathers it where it is used): per device, about 1/N of the weights."""
    min_size = FSDP_MIN_SIZE if min_size is None else min_size
    rep = NamedSharding(mesh, P())
    if not fsdp:
        return jax.tree.map(lambda _: rep, params)
    axes = tuple(mesh.axis_names)
    k = mesh.devices.size

    def spec(x):
        shape = np.shape(x)
        if int(np.prod(shape)) < min_size:
            return rep
        dims = [d for d in np.argsort(shape)[::-1] if shape[d] % k == 0]
        if not dims:
            return rep
        parts = [None] * len(shape)
        parts[dims[0]] = axes
        return NamedSharding(mesh, P(*parts))
    return jax.tree.map(spec, params)


# Smaller weights (norms, biases) stay replicated: splitting them saves nothing.
FSDP_MIN_SIZE = 2 ** 14


def _settings(settings):
    """`settings`, or None -> SampleSettings with Karlo's PRESET."""
    if settings is not None:
        return settings
    from unclip_jax.settings import SampleSettings
    return preset_settings(SampleSettings())


def preset_settings(settings, keep=frozenset()):
    """A SampleSettings with Karlo's preset in the fields it sets, except those in `keep`."""
    return dataclasses.replace(settings, **{k: v for k, v in PRESET.items() if k not in keep})
